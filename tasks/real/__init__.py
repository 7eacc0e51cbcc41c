"""Real-data tasks (HF `datasets` or local files): importing this package registers them.

punc_restore, protein_ss_spot, protein_contact_pair, mbpp, hotpot, arc. Shared machinery in `common.py`.
"""
from tasks.real import arc, hotpot, mbpp, protein, punc  # noqa: F401  (register on import)
