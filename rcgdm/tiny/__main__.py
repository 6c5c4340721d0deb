"""`python -m rcgdm.tiny`: build or train a tiny Stable Diffusion (rcgdm/tiny/build.py)."""

from rcgdm.tiny.build import main

main()
