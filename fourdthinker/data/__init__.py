"""Data: the SpatialVID layout, the synthetic 4D world that is written in it, and their readers."""
