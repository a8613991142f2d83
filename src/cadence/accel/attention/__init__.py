"""Token level: attention over fewer query-key pairs (sparse patterns) and the choice of
dense attention backend. Each model family's default sparse pattern is its
``Family.sparse_pattern`` (cadence.models; models/defaults.py says how they were chosen)."""
