"""One module per stage of `faceedit train` (see faceedit/world/train.py for the order)."""
