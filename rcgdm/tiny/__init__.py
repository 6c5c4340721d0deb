"""The tiny Stable Diffusion the project tests and demos on: build (random or trained), its training, its manifest."""
