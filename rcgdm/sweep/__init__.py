"""The sweep engine: a run of inference.py over every (prompt, target, guidance, best-of-N) combination.

plan.py: the combinations and the distinct images they need; rows.py: one results row per image and its key;
engine.py: sampling (each distinct image once), best-of-N, progress; resume.py: finishing an interrupted run;
outputs.py: the run's folders and files, checked before anything is written."""
