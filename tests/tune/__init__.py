"""tune: the rule, the split, the command end to end (aa_deploy/tune)."""
