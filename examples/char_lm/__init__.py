"""The char_lm example trainer; see train.py."""
