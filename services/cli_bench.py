"""``ridethrough bench``: measure the hot path against baselines in the same run."""
