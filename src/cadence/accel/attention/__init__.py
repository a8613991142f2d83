"""Token level: attention over fewer query-key pairs (sparse patterns) and the choice of
dense attention backend."""
