"""The names a run writes into its files, and its readers look up: the arms (``metrics.jsonl``'s "arm",
``checkpoints/<arm>``) and the decodings (``test_accuracy_by_decode``). Nothing imported: the report and the
plots read them without JAX."""

PRETRAIN = "pretrain"  # the shared cross-entropy pre-training every arm starts from
CE = "ce"  # cross-entropy: the arm that continues the pre-training, its optimiser included
OAT = "oat"  # Online Anchor-based Training

# The four decodings of a test batch's outputs: argmax of a * (z + 1) with the batch's own anchor a (OAT's,
# eq. 4), with each sample's own anchor (as in a batch of one), with the epoch's mean training anchor, and with
# the uniform anchor (the plain argmax of the outputs).
BATCH, SINGLE, TRAIN_ANCHOR, UNIFORM = "batch", "single", "train_anchor", "uniform"
DECODES = (BATCH, SINGLE, TRAIN_ANCHOR, UNIFORM)
