"""The classifier example trainer; see train.py."""
