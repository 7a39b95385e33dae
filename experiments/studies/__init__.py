"""The comparative study: its plan (plan.py) and running it (runner.py); entry point experiments/study.py."""
