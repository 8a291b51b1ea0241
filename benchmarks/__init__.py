"""deploy_ctc's benchmarks (not part of the installed package): run from a source checkout, see README.md here."""
