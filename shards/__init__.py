"""Offline conversion of videos into WebDataset shards of frame triplets (t-1, t, t+1)."""
