"""Byte-level data: FASTA / raw-bytes readers, grain training windows, Markov baselines."""
