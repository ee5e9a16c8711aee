"""The adding-problem example trainer; see train.py."""
