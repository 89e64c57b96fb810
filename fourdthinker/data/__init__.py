"""Data: schemas, video decoding, collators, SpatialVID reader, synthetic 4D world."""
