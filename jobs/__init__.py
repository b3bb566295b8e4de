"""explab jobs: one package per paper (``jobs/<name>/job.py`` defines ``JOB``)."""
