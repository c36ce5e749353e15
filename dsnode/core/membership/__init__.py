"""Pure membership pieces: who may take part in the cluster's protocols."""
