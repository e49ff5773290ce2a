"""The learn job's defaults, in one place (the CLI and the Python API both read them)."""

N_ANCHORS = 8            # examples of a task kept in the catalog to guard it against forgetting
RESERVE = 0.0            # fraction of the payload pages left free after a learn (no longer needed as swap
                         # space: a learn commits evictions first when its entries need their pages, learn/commit.py)
MAX_ENTRY_TOKENS = 256   # longest entry of a bank created by a learn
GAINS_KEY = "gains"      # catalog extra: entry id -> likelihood gain measured when it was written
COMPACT_METHODS = ("none", "perlayer", "genv")   # ikv-learn --compact (learn/compact.py, learn/perlayer.py)
COMPACT_KEEP = 0.5       # --keep of a new perlayer bank: share of an entry's tokens each layer keeps
                         # (chosen on dev questions of the train files, README "Compact entries")
COMPACT_SLOTS = 10       # --slots of a new genv bank (spike: 0.617 vs 0.650 full on train-template paraphrases;
                         # on the test files far lower, README "Compact entries")
SCORE_BATCH = 8          # examples per decoder pass when a learn encodes and scores (learn/candidates.py;
                         # padded batches: README "Learn speed")
