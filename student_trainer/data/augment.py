"""TinyBERT-style data augmentation (Jiao et al., 2020): word replacement by a masked LM.

For every sentence, each *eligible* word (alphabetic, not a stop word) gets a candidate list
once: when the word is a single word piece, the top ``M`` predictions of a fill-mask model for
that word masked (the input is ``masked sentence [SEP] original sentence``, as TinyBERT does),
keeping whole-word candidates other than the word itself; when it splits into several pieces,
its ``M`` nearest neighbours in an optional word-vector file (GloVe text format), by cosine.
Then ``N`` copies are drawn: each eligible word with candidates is replaced, with probability
``p``, by one of them chosen uniformly. Unlike TinyBERT, negations and other stop words are
never replaced, and every sentence yields exactly ``1 + N`` rows (the original first, copies
not de-duplicated) so a run can resume by counting rows; the teacher service's cache makes
repeated questions free.

Randomness is per sentence (seeded by ``seed`` and the sentence's index), and the MLM runs on
fixed chunks of sentences, so an interrupted run that resumes writes the same bytes as one that
was never interrupted.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel

from shared.errors import UserError
from student_trainer.data.tasks import Example, TaskData
from student_trainer.data.tsv import tsv_header, tsv_line

WORD = re.compile(r"\w+|[^\w\s]")
STOP_WORDS = frozenset(
    """
    a an the and or but nor if then else so than too very just only also as at by for from in into of off
    on onto out over under up down to with without about against between through during before after
    above below again further once here there when where why how all any both each few more most other
    some such own same can will would shall should could may might must do does did doing done have has
    had having be is am are was were been being i me my myself we our ours ourselves you your yours
    yourself yourselves he him his himself she her hers herself it its itself they them their theirs
    themselves this that these those what which who whom whose not no never none nothing neither
    n't don doesn didn isn wasn aren weren won wouldn shouldn couldn can cannot s t d ll m o re ve y
    """.split()
)
CHUNK_SENTENCES = 64


@dataclass(frozen=True)
class AugmentSettings:
    """What decides the output; a resumed run must use the same (checked against a sidecar file)."""

    source: str  # the input: a file path or task/split/data_dir
    model_name_or_path: str
    num_aug: int = 20
    top_m: int = 15
    replace_prob: float = 0.4
    seed: int = 42
    word_vectors: str | None = None


def is_eligible(word: str) -> bool:
    return word.isalpha() and word.lower() not in STOP_WORDS


def match_case(candidate: str, original: str) -> str:
    if original.isupper() and len(original) > 1:
        return candidate.upper()
    return candidate.title() if original[:1].isupper() else candidate


class WordVectors:
    """Unit-normalised word vectors (GloVe text format: ``word v1 v2 ...`` per line) for neighbours."""

    def __init__(self, words: list[str], vectors: np.ndarray):
        self.index = {w: i for i, w in enumerate(words)}
        self.words = words
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.vectors = vectors / np.where(norms == 0, 1, norms)

    @classmethod
    def load(cls, path: str | Path, max_words: int = 100_000) -> WordVectors:
        words, rows = [], []
        try:
            with open(path, encoding="utf-8") as handle:
                for line_no, line in enumerate(handle, start=1):
                    if len(words) >= max_words:
                        break
                    parts = line.rstrip().split(" ")
                    try:
                        values = [float(v) for v in parts[1:]]
                    except ValueError:
                        values = []
                    if not values or (rows and len(values) != len(rows[0])):
                        raise UserError(
                            f"{path}, line {line_no}: expected 'word v1 v2 ...' (GloVe text format)"
                        )
                    words.append(parts[0])
                    rows.append(values)
        except OSError as err:
            raise UserError(f"cannot read word vectors {path}: {err.strerror}") from err
        if not words:
            raise UserError(f"{path}: no word vectors")
        return cls(words, np.asarray(rows, dtype=np.float32))

    def nearest(self, word: str, k: int) -> list[str]:
        """Up to ``k`` eligible neighbours by cosine similarity, most similar first."""
        i = self.index.get(word.lower())
        if i is None:
            return []
        similarity = self.vectors @ self.vectors[i]
        similarity[i] = -np.inf
        ranked = np.argsort(-similarity, kind="stable")
        return [self.words[j] for j in ranked[: 4 * k] if is_eligible(self.words[j])][:k]


class Augmenter:
    """Candidate lists from a fill-mask model (batched) and an optional word-vector file."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        *,
        top_m: int = 15,
        word_vectors: WordVectors | None = None,
        batch_size: int = 32,
        max_seq_length: int = 256,
    ):
        if tokenizer.mask_token_id is None:
            raise UserError(
                "the augmentation model's tokenizer has no mask token: it is not a fill-mask model"
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        self.top_m, self.word_vectors = top_m, word_vectors
        self.batch_size, self.max_seq_length = batch_size, max_seq_length
        self.device = next(model.parameters()).device
        self.special_ids = set(tokenizer.all_special_ids)

    @classmethod
    def load(cls, model_name_or_path: str, *, device: str = "cpu", **options) -> Augmenter:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=False)
            model = AutoModelForMaskedLM.from_pretrained(model_name_or_path, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load a fill-mask model from {model_name_or_path!r}: {err}") from err
        return cls(model.to(device), tokenizer, **options)

    def candidates(self, texts: Sequence[str]) -> list[dict[int, list[str]]]:
        """Per text: ``{word index: candidate replacements}`` for its eligible words (may be empty)."""
        results: list[dict[int, list[str]]] = [{} for _ in texts]
        queries: list[tuple[int, int, str, str]] = []  # (text, word index, masked text, word)
        for t, text in enumerate(texts):
            for w, match in enumerate(WORD.finditer(text)):
                word = match.group()
                if not is_eligible(word):
                    continue
                if len(self.tokenizer.tokenize(word)) == 1:
                    masked = text[: match.start()] + self.tokenizer.mask_token + text[match.end() :]
                    queries.append((t, w, masked, word))
                elif self.word_vectors is not None:
                    neighbours = self.word_vectors.nearest(word, self.top_m)
                    if neighbours:
                        results[t][w] = [match_case(n, word) for n in neighbours]
        for start in range(0, len(queries), self.batch_size):
            batch = queries[start : start + self.batch_size]
            predictions = self._fill_mask([q[2] for q in batch], [texts[q[0]] for q in batch])
            for (t, w, _, word), predicted in zip(batch, predictions, strict=True):
                kept = [match_case(c, word) for c in predicted if c.lower() != word.lower()]
                if kept:
                    results[t][w] = kept
        return results

    @torch.inference_mode()
    def _fill_mask(self, masked: list[str], originals: list[str]) -> list[list[str]]:
        """Top-M whole-word predictions at the mask of ``masked [SEP] original`` for each pair.

        Memory grows as batch x length x vocabulary (the MLM scores every position).
        """
        encoded = self.tokenizer(
            masked,
            originals,
            truncation=True,
            max_length=self.max_seq_length,
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        logits = self.model(**encoded).logits
        rows, cols = (encoded["input_ids"] == self.tokenizer.mask_token_id).nonzero(as_tuple=True)
        first = [i for i in range(len(rows)) if i == 0 or rows[i] != rows[i - 1]]  # a text may hold "[MASK]"
        rows, cols = rows[first], cols[first]
        top = logits[rows, cols].topk(min(self.top_m, logits.shape[-1]), dim=-1).indices.tolist()
        predictions: list[list[str]] = [[] for _ in masked]  # stays empty when truncation cut the mask
        for row, ids in zip(rows.tolist(), top, strict=True):
            tokens = self.tokenizer.convert_ids_to_tokens(ids)
            words = [
                self.tokenizer.convert_tokens_to_string([token]).strip()
                for token, token_id in zip(tokens, ids, strict=True)
                if token_id not in self.special_ids and not token.startswith("##")
            ]
            predictions[row] = [w for w in words if is_eligible(w)]
        return predictions


def replace_words(
    text: str, candidates: dict[int, list[str]], rng: random.Random, replace_prob: float
) -> str:
    """One augmented copy: each word with candidates is replaced with probability ``replace_prob``."""
    pieces, last = [], 0
    for w, match in enumerate(WORD.finditer(text)):
        options = candidates.get(w)
        if options and rng.random() < replace_prob:
            pieces += [text[last : match.start()], rng.choice(options)]
            last = match.end()
    return "".join(pieces) + text[last:]


def _settings_file(output: Path) -> Path:
    return output.with_name(output.name + ".augment.json")


def _resume_point(
    output: Path, settings: AugmentSettings, rows_per_sentence: int, chunk: int, total: int
) -> int:
    """How many input sentences the existing output already holds (whole chunks), trimming the rest.

    Resuming at a chunk boundary re-runs the MLM on exactly the batches of an uninterrupted run.
    """
    sidecar = _settings_file(output)
    if not output.exists():
        return 0
    if not sidecar.exists():
        raise UserError(f"{output} exists but was not written by `augment` (no {sidecar.name}); remove it")
    saved = json.loads(sidecar.read_text(encoding="utf-8"))
    wanted = asdict(settings)
    if saved != wanted:
        changed = ", ".join(sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k)))
        raise UserError(f"{output} was written with different settings ({changed}); remove it to start over")
    with open(output, "rb") as handle:
        lines = handle.read().split(b"\n")
    complete_rows = len(lines) - 2  # the header, and whatever follows the last newline
    done = min(max(0, complete_rows) // rows_per_sentence, total)
    if done < total:
        done = done // chunk * chunk
    keep = b"\n".join(lines[: 1 + done * rows_per_sentence]) + b"\n"
    with open(output, "r+b") as handle:
        handle.truncate(len(keep))
    return done


def augment_task(
    data: TaskData,
    output: str | Path,
    augmenter: Augmenter,
    settings: AugmentSettings,
    *,
    chunk_sentences: int = CHUNK_SENTENCES,
    disable_tqdm: bool = False,
) -> dict[str, int]:
    """Write ``1 + num_aug`` rows per example to a TSV the loaders read (``sentence[1,2]``, ``label``).

    Appends to an existing output written with the same settings, skipping what it holds.
    Returns counts: sentences done before, written now, rows in the file.
    """
    output = Path(output)
    rows_per_sentence = 1 + settings.num_aug
    done = _resume_point(output, settings, rows_per_sentence, chunk_sentences, len(data))
    if done == 0:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(tsv_header(data.is_pair, data.is_labelled), encoding="utf-8")
        _settings_file(output).write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")
    examples = data.examples
    progress = tqdm(total=len(examples), initial=done, desc="augment", disable=disable_tqdm)
    with open(output, "a", encoding="utf-8") as handle:
        for start in range(done, len(examples), chunk_sentences):
            chunk: list[Example] = examples[start : start + chunk_sentences]
            texts_a = augmenter.candidates([e.text_a for e in chunk])
            texts_b = augmenter.candidates([e.text_b for e in chunk]) if data.is_pair else [{} for _ in chunk]
            for offset, example in enumerate(chunk):
                rng = random.Random(f"augment/{settings.seed}/{start + offset}")
                handle.write(tsv_line(example, data.is_labelled))
                for _ in range(settings.num_aug):
                    text_a = replace_words(example.text_a, texts_a[offset], rng, settings.replace_prob)
                    text_b = None
                    if example.text_b is not None:
                        text_b = replace_words(example.text_b, texts_b[offset], rng, settings.replace_prob)
                    handle.write(tsv_line(Example(text_a, text_b, example.label), data.is_labelled))
            handle.flush()
            progress.update(len(chunk))
    progress.close()
    return {"resumed_from": done, "written": len(examples) - done, "rows": len(examples) * rows_per_sentence}
