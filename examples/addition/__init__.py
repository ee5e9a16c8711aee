"""The addition example trainer; see train.py."""
