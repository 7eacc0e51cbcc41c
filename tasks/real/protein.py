"""Protein tasks: secondary-structure spot labelling and contact-pair QA (the original
`train_protein_ss_spot_sft.py` and `train_protein_contact_pair_sft.py`).

protein_ss_spot
  Rows (lamm-mit/protein_secondary_structure_from_PDB, one split `train`): `PDB_ID`, `Sequence` (letters kept,
  upper case), `Secondary_structure` (whitespace removed); the two must have equal lengths. The three sets are
  hash-separated on `{PDB_ID}|{length}|{sequence[:16]}` (train 0-7, val 8, test 9; the original's val was 8-9).
  Per example: a random window of max_seq_len residues, k = min(num_queries, window) query positions (the
  prefix, the suffix or a random sorted set), written 1-based and comma-separated; the answer is the structure
  symbols at those positions, concatenated.
protein_contact_pair
  Rows (heya5/protein_contact_map, splits train/valid/test): `name`, `seq`, `tertiary` ([L][3] coordinates),
  `valid_mask`. Per example: a random window, then num_pairs residue pairs (i < j, |i-j| >= min_sep, distinct,
  both valid), written `i-j` 1-based and comma-separated; bit 1 iff their distance <= contact_cutoff (in the
  dataset's coordinate unit). `balanced` sampling (the default) draws round(num_pairs * pos_ratio) contacts
  (clamped to [1, num_pairs-1]) and the rest non-contacts, shuffled; `random` draws pairs uniformly, which
  makes nearly every bit 0 (the original's saturated metric).

Layouts (prompt = context + trigger; INST is the task's instruction, notes are `Protein note {id}: {seq[:N]}`
from the same set, each preceded by a blank line; the original's inverted `--q_first` naming made explicit):
  question_first  {INST}\\nSequence:\\n{seq}\\n{Q}\\nNotes:\\n{notes}  +  \\n\\n{A}
  question_last   {INST}\\nNotes:\\n{notes}\\n\\nSequence:\\n{seq}\\n{Q}  +  \\n{A}
with Q = `Queries(1-based): ...` / `Pairs(1-based): ...` and A = `Answer:\\n` / `Answer bits:\\n`.

Metrics: token accuracy, and of the first generated line: `residue_acc` (per queried residue) and `seq_acc`
(all residues) for protein_ss_spot; `pair_acc` (per bit) and `seq_acc` for protein_contact_pair.
"""
from __future__ import annotations

import math
import re
from typing import Iterator, Literal

from pydantic import Field, model_validator

from tasks.base import Example, register
from tasks.real.common import RealParams, RealTask, Rows, fill_notes, first_line, note_stream

MAX_NOTES = 100_000  # no cap besides the token budget
SS_INST = ("Task: Protein secondary-structure spot labeling.\n"
           "Output one symbol per queried residue index (same order).\n")
CONTACT_INST = ("Task: Protein contact QA.\nFor each queried residue pair, output 1 if in contact, else 0.\n"
                "Output bits in the same order, no spaces.\n")
RANDOM_TRIES = (200, 40)  # random pair sampling: max(200, 40 * num_pairs) draws
BALANCED_TRIES = (800, 300)  # balanced pair sampling: max(800, 300 * num_pairs) draws


class ProteinParams(RealParams):
    n_train: int = Field(1600, ge=1)
    n_val: int = Field(320, ge=1)
    n_test: int = Field(320, ge=1)
    layout: Literal["question_first", "question_last"] = "question_first"
    max_seq_len: int = Field(512, ge=1)
    min_seq_len: int = Field(96, ge=1)
    fill_notes: bool = True
    note_pool_size: int = Field(2048, ge=1)
    max_note_seq_len: int = Field(256, ge=1)
    max_prompt_tokens: int = Field(2048, ge=16)
    min_prompt_tokens: int = Field(1024, ge=0)
    max_answer_tokens: int = Field(128, ge=1)


class ProteinTask(RealTask):
    """Shared by both protein tasks: the note pool and the two layouts."""

    INST: str
    QUERY_LABEL: str
    ANSWER_CUE: str

    params: ProteinParams

    def note_of(self, row: dict) -> str | None:
        raise NotImplementedError

    def _note_pool(self, role: str, rows: Rows) -> list[str]:
        order = list(rows.indices)
        self.rng(role, "notes").shuffle(order)
        pool = [self.note_of(rows.ds[i]) for i in order[: self.params.note_pool_size]]
        return [n for n in pool if n]

    def layout_parts(self, window: str, query: str) -> tuple[str, str, str]:
        """(head, tail, trigger): notes go between head and tail."""
        q = f"Sequence:\n{window}\n{self.QUERY_LABEL}: {query}"
        if self.params.layout == "question_first":
            return f"{self.INST}\n{q}\nNotes:\n", "", f"\n\n{self.ANSWER_CUE}"
        return f"{self.INST}\nNotes:\n", f"\n\n{q}", f"\n{self.ANSWER_CUE}"

    def build(self, role: str, idx: int, pool: list[str], own_note: str | None, window: str, query: str,
              answer: str, **meta) -> Example | str:
        head, tail, trigger = self.layout_parts(window, query)
        notes = ("\n\n" + n for n in note_stream(self.rng(role, "notes", idx), pool, own_note))
        context = fill_notes(self.tok, head, tail, self.trigger_len(trigger), notes, self.params.max_prompt_tokens,
                             MAX_NOTES if self.params.fill_notes else 0, self.encode_note)
        if context is None:
            return "sequence and queries over max_prompt_tokens"
        return self.example(context, trigger, answer, layout=self.params.layout, **meta)


def _symbols_score(predicted: str, gold: str, alphabet: str | None = None) -> tuple[float, float]:
    pred = "".join(first_line(predicted).split())
    if alphabet is not None:
        pred = "".join(ch for ch in pred if ch in alphabet)
    hits = sum(p == g for p, g in zip(pred, gold))
    return hits / max(1, len(gold)), float(pred == gold)


# ---------------------------------------------------------------------------------------------------------------


class ProteinSSParams(ProteinParams):
    dataset: str = "lamm-mit/protein_secondary_structure_from_PDB"
    dataset_config: str | None = None
    train_split: str = "train"
    val_split: str = "train"
    test_split: str | None = "train"
    num_queries: int = Field(48, ge=1)
    query_region: Literal["random", "prefix", "suffix"] = "random"


def clean_sequence(seq) -> str:
    return re.sub(r"[^A-Z]", "", str(seq or "").upper())


@register
class ProteinSSSpot(ProteinTask):
    name = "protein_ss_spot"
    Params = ProteinSSParams
    TEMPLATE_VERSION = 1
    unit_metrics = ("residue_acc", "seq_acc")
    metric_definitions = {
        "residue_acc": "share of queried residues whose structure symbol is right, first generated line by position",
        "seq_acc": "share of examples whose first generated line (spaces removed) equals all queried symbols",
    }
    description = "label the secondary structure of queried residues of a protein sequence"
    key_columns = ("PDB_ID", "Sequence")
    INST = SS_INST
    QUERY_LABEL = "Queries(1-based)"
    ANSWER_CUE = "Answer:\n"

    params: ProteinSSParams

    def row_key(self, row: dict) -> str:
        seq = clean_sequence(row.get("Sequence"))
        return f"{row.get('PDB_ID')}|{len(seq)}|{seq[:16]}"

    def note_of(self, row: dict) -> str | None:
        seq = clean_sequence(row.get("Sequence"))
        return f"Protein note {row.get('PDB_ID')}: {seq[: self.params.max_note_seq_len]}" if seq else None

    def _examples(self, role: str, rows: Rows) -> Iterator[Example | str]:
        p = self.params
        pool = self._note_pool(role, rows) if p.fill_notes else []
        for idx, row in rows:
            seq = clean_sequence(row.get("Sequence"))
            ss = "".join(str(row.get("Secondary_structure") or "").split())
            if not seq or len(seq) != len(ss):
                yield "sequence and structure lengths differ"
                continue
            if len(seq) < p.min_seq_len:
                yield "sequence shorter than min_seq_len"
                continue
            rng = self.rng(role, "ex", idx)
            start = rng.randrange(len(seq) - p.max_seq_len + 1) if len(seq) > p.max_seq_len else 0
            window, labels = seq[start:start + p.max_seq_len], ss[start:start + p.max_seq_len]
            k = min(p.num_queries, len(window))
            if p.query_region == "prefix":
                positions = list(range(k))
            elif p.query_region == "suffix":
                positions = list(range(len(window) - k, len(window)))
            else:
                positions = sorted(rng.sample(range(len(window)), k))
            answer = "".join(labels[i] for i in positions)
            yield self.build(role, idx, pool, self.note_of(row), window, ",".join(str(i + 1) for i in positions),
                             answer, pdb_id=row.get("PDB_ID"), window_start=start, positions=positions)

    def score(self, example: Example, predicted: str) -> dict[str, float]:
        residue_acc, seq_acc = _symbols_score(predicted, example.answer)
        return {"residue_acc": residue_acc, "seq_acc": seq_acc}


# ---------------------------------------------------------------------------------------------------------------


class ProteinContactParams(ProteinParams):
    dataset: str = "heya5/protein_contact_map"
    dataset_config: str | None = None
    train_split: str = "train"
    val_split: str = "valid"
    test_split: str | None = "test"
    n_train: int = Field(2000, ge=1)
    n_val: int = Field(200, ge=1)
    n_test: int = Field(40, ge=1)  # the test split has 40 proteins
    max_seq_len: int = Field(384, ge=1)
    num_pairs: int = Field(32, ge=1)
    min_sep: int = Field(8, ge=1)
    contact_cutoff: float = Field(8.0, gt=0)
    pair_sampling: Literal["balanced", "random"] = "balanced"
    pos_ratio: float = Field(0.5, gt=0, lt=1)

    @model_validator(mode="after")
    def _check_pairs(self):
        if self.pair_sampling == "balanced" and self.num_pairs < 2:
            raise ValueError("num_pairs must be >= 2 for balanced pair_sampling (one contact and one non-contact)")
        return self


def _coords(value) -> tuple[float, float, float] | None:
    try:
        x, y, z = (float(c) for c in value)
    except (TypeError, ValueError):
        return None
    return (x, y, z) if all(math.isfinite(c) for c in (x, y, z)) else None


@register
class ProteinContactPair(ProteinTask):
    name = "protein_contact_pair"
    Params = ProteinContactParams
    TEMPLATE_VERSION = 1
    unit_metrics = ("pair_acc", "seq_acc")
    metric_definitions = {
        "pair_acc": "share of queried pairs whose contact bit is right (first generated line, 0/1 kept, by position)",
        "seq_acc": "share of examples whose bits (first generated line, 0/1 kept) all equal the answer",
    }

    @classmethod
    def chance_levels(cls, params: ProteinContactParams) -> dict[str, float]:
        """Bits guessed uniformly: 1/2 each, whatever the share of contacts."""
        return {"pair_acc": 0.5, "seq_acc": 0.5 ** params.num_pairs}
    description = "say which queried residue pairs of a protein are in contact"
    key_columns = ("name",)
    INST = CONTACT_INST
    QUERY_LABEL = "Pairs(1-based)"
    ANSWER_CUE = "Answer bits:\n"

    params: ProteinContactParams

    def row_key(self, row: dict) -> str:
        return str(row["name"])

    def note_of(self, row: dict) -> str | None:
        seq = str(row.get("seq") or "")
        return f"Protein note {row.get('name')}: {seq[: self.params.max_note_seq_len]}" if seq else None

    def sample_pairs(self, rng, valid: list[int], coords: list) -> list[tuple[int, int, int]] | None:
        """num_pairs (i, j, bit) with i < j, or None when the window cannot provide them."""
        p = self.params

        def draw():
            i, j = rng.choice(valid), rng.choice(valid)
            if i == j or abs(i - j) < p.min_sep:
                return None
            i, j = min(i, j), max(i, j)
            return i, j, int(math.dist(coords[i], coords[j]) <= p.contact_cutoff)

        seen: set[tuple[int, int]] = set()
        if p.pair_sampling == "random":
            pairs = []
            for _ in range(max(RANDOM_TRIES[0], RANDOM_TRIES[1] * p.num_pairs)):
                pair = draw()
                if pair and pair[:2] not in seen:
                    seen.add(pair[:2])
                    pairs.append(pair)
                    if len(pairs) == p.num_pairs:
                        return pairs
            return None
        n_pos = min(max(round(p.num_pairs * p.pos_ratio), 1), p.num_pairs - 1)
        want = {1: n_pos, 0: p.num_pairs - n_pos}
        got: dict[int, list] = {1: [], 0: []}
        for _ in range(max(BALANCED_TRIES[0], BALANCED_TRIES[1] * p.num_pairs)):
            pair = draw()
            if pair and pair[:2] not in seen and len(got[pair[2]]) < want[pair[2]]:
                seen.add(pair[:2])
                got[pair[2]].append(pair)
                if len(got[1]) == want[1] and len(got[0]) == want[0]:
                    pairs = got[1] + got[0]
                    rng.shuffle(pairs)
                    return pairs
        return None

    def _examples(self, role: str, rows: Rows) -> Iterator[Example | str]:
        p = self.params
        pool = self._note_pool(role, rows) if p.fill_notes else []
        for idx, row in rows:
            seq = str(row.get("seq") or "")
            tertiary, mask = row.get("tertiary") or [], row.get("valid_mask") or []
            if not seq or not (len(seq) == len(tertiary) == len(mask)):
                yield "sequence, coordinates and mask lengths differ"
                continue
            if len(seq) < p.min_seq_len:
                yield "sequence shorter than min_seq_len"
                continue
            rng = self.rng(role, "ex", idx)
            start = rng.randrange(len(seq) - p.max_seq_len + 1) if len(seq) > p.max_seq_len else 0
            window = seq[start:start + p.max_seq_len]
            coords = [_coords(c) for c in tertiary[start:start + p.max_seq_len]]
            valid = [i for i, c in enumerate(coords) if c is not None and bool(mask[start + i])]
            pairs = self.sample_pairs(rng, valid, coords) if len(valid) >= 2 else None
            if pairs is None:
                yield f"too few {'contact and non-contact ' if p.pair_sampling == 'balanced' else ''}pairs"
                continue
            query = ",".join(f"{i + 1}-{j + 1}" for i, j, _ in pairs)
            bits = "".join(str(b) for _, _, b in pairs)
            yield self.build(role, idx, pool, self.note_of(row), window, query, bits, name=row.get("name"),
                             window_start=start, pairs=[[i, j] for i, j, _ in pairs])

    def score(self, example: Example, predicted: str) -> dict[str, float]:
        pair_acc, seq_acc = _symbols_score(predicted, example.answer, alphabet="01")
        return {"pair_acc": pair_acc, "seq_acc": seq_acc}
