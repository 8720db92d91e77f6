"""Text -> tokens -> per-region shards; deterministic and resumable.

Sources (`data.source`):
- `kjv`: the King James Bible shipped with the package; its 66 books are the domains.
- a text file, a directory of `*.txt` files, or a glob: every file is a domain.
- `hf:<dataset>`: anything `datasets.load_dataset` can stream (a hub name or a local folder),
  read as one iid stream; the leading `data.eval_docs` documents are held out for eval. (Local
  files are read as they are: `datasets`, seconds of imports per rank, is imported for streams only.)

Local corpora are tokenized once and cut into sequences of seq_len + 1 tokens; every region gets
a disjoint set of them (`iid`: a seeded shuffle dealt round-robin; `non_iid`: every domain's
sequences split among regions by Dirichlet(dirichlet_alpha) proportions), and the ranks of a
region deal the region's set among themselves. The tail `data.eval_fraction` of every domain is
held out for eval.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import queue
import re
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

import numpy as np
import torch

from cocodc.config import ConfigError, DataConfig

if TYPE_CHECKING:
    import datasets

KJV_PATH = Path(__file__).parent / "corpus" / "kjv.txt.gz"
EOS_TEXT = "<|endoftext|>"
_CHAPTER_HEADER = re.compile(r"^(\S.*?) \d+$", re.MULTILINE)


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, texts: list[str]) -> list[np.ndarray]: ...


class ByteTokenizer:
    """UTF-8 bytes; byte 0 (absent from text) separates documents."""

    vocab_size = 256
    eos_id = 0

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]


# What tokenizers in the field call the end of a text, in the order looked for.
EOS_NAMES = (EOS_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


class BPETokenizer:
    """A tokenizer of the `tokenizers` library: the byte-level BPE trained on the run's own corpus,
    or one from a file (data.tokenizer hf:PATH), whose end-of-text token is `eos_text`."""

    def __init__(self, tokenizer: Any, eos_text: str = EOS_TEXT):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_text = eos_text
        self.eos_id = tokenizer.token_to_id(eos_text)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        """From a tokenizer.json; its end-of-text token is the one tokenizer_config.json beside it
        names, else the first of EOS_NAMES it has."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own kinds for a file it cannot read
            raise ConfigError(f"tokenizer {path} cannot be read ({str(err).splitlines()[0][:200]})") from None
        settings = path.with_name("tokenizer_config.json")
        try:
            named = json.loads(settings.read_text()).get("eos_token") if settings.is_file() else None
        except (ValueError, AttributeError):
            raise ConfigError(f"{settings} is not a JSON object") from None
        named = named.get("content") if isinstance(named, dict) else named  # an AddedToken's fields
        eos = [named] if named else [name for name in EOS_NAMES if tokenizer.token_to_id(name) is not None]
        if not eos or tokenizer.token_to_id(eos[0]) is None:
            raise ConfigError(f"tokenizer {path} has no end-of-text token (looked for {named or ', '.join(EOS_NAMES)})")
        return cls(tokenizer, eos[0])

    def save(self, path: Path) -> None:
        """tokenizer.json, and beside it a tokenizer_config.json naming its end-of-text token."""
        for name, write in (
            (path.name, lambda tmp: self._tokenizer.save(str(tmp))),
            ("tokenizer_config.json", lambda tmp: tmp.write_text(json.dumps({"eos_token": self.eos_text}))),
        ):
            tmp = path.with_name(f"{name}.{os.getpid()}.tmp")  # the regions of an ft run may each write it
            write(tmp)
            tmp.replace(path.with_name(name))

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tokenizer.encode_batch(texts)]


# ---------------------------------------------------------------------------------- sources


def load_domains(config: DataConfig) -> list[tuple[str, str]]:
    """(domain name, text) pairs of a local corpus, read through `datasets`."""
    if config.source == "kjv":
        (text,) = _read_documents([KJV_PATH])
        return split_books(text)
    files = _text_files(config.source)
    return [(str(f), text) for f, text in zip(files, _read_documents(files), strict=True)]


def split_books(text: str) -> list[tuple[str, str]]:
    """Split the KJV text (chapters headed 'Book N') into one text per book, in order."""
    books: dict[str, list[str]] = {}
    headers = list(_CHAPTER_HEADER.finditer(text))
    for header, following in zip(headers, [*headers[1:], None], strict=True):
        end = following.start() if following else len(text)
        books.setdefault(header.group(1), []).append(text[header.start() : end])
    return [(name, "".join(chapters)) for name, chapters in books.items()]


def _text_files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    else:
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    if not files:
        raise ConfigError(f"data.source {source!r}: no such file, or no .txt files in it")
    return files


def _read_documents(files: list[Path]) -> list[str]:
    """Each file's whole text (UTF-8; gzip-compressed where it ends in .gz)."""
    texts = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as f:
            texts.append(f.read())
    return texts


# ------------------------------------------------------------------------ local corpus shards


@dataclass
class Corpus:
    """A tokenized local corpus cut into training and eval sequences of seq_len + 1 tokens."""

    sequences: np.ndarray  # (n, seq_len + 1)
    sequence_domain: np.ndarray  # (n,) index into domains
    eval_sequences: np.ndarray  # (m, seq_len + 1)
    domains: list[str]


def build_corpus(domains: list[tuple[str, str]], tokenizer: Tokenizer, seq_len: int, eval_fraction: float) -> Corpus:
    token_arrays = tokenizer.encode([text for _, text in domains])
    train, train_domain, held_out = [], [], []
    for index, tokens in enumerate(token_arrays):
        tokens = np.append(tokens, tokenizer.eos_id)
        split_at = len(tokens) - int(len(tokens) * eval_fraction)
        train_part = cut_sequences(tokens[:split_at], seq_len)
        train.append(train_part)
        train_domain.append(np.full(len(train_part), index))
        held_out.append(cut_sequences(tokens[split_at:], seq_len))
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    return Corpus(
        sequences=np.concatenate(train).astype(dtype),
        sequence_domain=np.concatenate(train_domain),
        eval_sequences=np.concatenate(held_out).astype(dtype),
        domains=[name for name, _ in domains],
    )


def cut_sequences(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Sequences of seq_len + 1 tokens at stride seq_len: each target is the next input's first."""
    count = max(0, (len(tokens) - 1) // seq_len)
    if count == 0:
        return np.empty((0, seq_len + 1), dtype=tokens.dtype)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)
    return np.ascontiguousarray(windows[: count * seq_len : seq_len])


def region_shards(
    sequence_domain: np.ndarray, regions: int, split: str, dirichlet_alpha: float, seed: int
) -> list[np.ndarray]:
    """Disjoint sequence indices for each region (sorted)."""
    rng = np.random.default_rng([seed, 0x5EED])
    if split == "iid":
        order = rng.permutation(len(sequence_domain))
        return [np.sort(order[m::regions]) for m in range(regions)]
    pieces: list[list[np.ndarray]] = [[] for _ in range(regions)]
    for domain in np.unique(sequence_domain):
        members = np.flatnonzero(sequence_domain == domain)
        shares = rng.dirichlet(np.full(regions, dirichlet_alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for m, piece in enumerate(np.split(members, cuts)):
            pieces[m].append(piece)
    return [np.sort(np.concatenate(p)) for p in pieces]


class ShardLoader:
    """Batches from one rank's (or client's) share of a corpus; reshuffled every epoch; resumable
    mid-epoch."""

    def __init__(
        self, sequences: np.ndarray, indices: np.ndarray, batch_size: int, seed: list[int], owner: str = "a rank"
    ):
        if len(indices) < batch_size:
            raise ConfigError(
                f"{owner}'s data shard holds {len(indices)} sequences, fewer than a step's batch of {batch_size} "
                "(train.batch_size x train.grad_accum); use more data, fewer shards or, for non_iid, a larger "
                "data.dirichlet_alpha"
            )
        self.sequences, self.indices, self.batch_size, self.seed = sequences, indices, batch_size, seed
        self.owner = owner
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        return self.indices[np.random.default_rng([*self.seed, self.epoch]).permutation(len(self.indices))]

    def next_batch(self, size: int | None = None) -> torch.Tensor:
        """The next `size` (train.batch_size unless given) sequences of this epoch's order."""
        size = self.batch_size if size is None else size
        if size > len(self._order):
            raise ValueError(f"{self.owner}: a batch of {size} sequences asked of a shard of {len(self._order)}")
        if self.position + size > len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        rows = self._order[self.position : self.position + size]
        self.position += size
        return torch.from_numpy(self.sequences[np.sort(rows)].astype(np.int64))

    def skip(self, batches: int) -> None:
        """Move on by `batches` of train.batch_size, as that many `next_batch()` would."""
        per_epoch = len(self.indices) // self.batch_size  # whole batches: an epoch's tail is never read
        done = self.epoch * per_epoch + self.position // self.batch_size + batches
        epoch, read = divmod(done, per_epoch)
        if read == 0 and done:  # an epoch's last batch read: the next one starts the next epoch
            epoch, read = epoch - 1, per_epoch
        self.epoch, self.position = epoch, read * self.batch_size
        self._order = self._epoch_order()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "shard": len(self.indices)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()

    def load_resharded(self, states: list[dict[str, int]]) -> None:
        """Continue a region whose ranks were dealt its shard differently (another ranks_per_region):
        at the same epoch, as far into it as the region's first rank was (whole batches). Which
        sequences come next differs from an unchanged resume: the shard is dealt anew."""
        first = states[0]
        done = int(first["position"]) / int(first["shard"])
        batches = min(int(done * len(self.indices)) // self.batch_size, len(self.indices) // self.batch_size - 1)
        self.epoch, self.position = int(first["epoch"]), batches * self.batch_size
        self._order = self._epoch_order()


# ------------------------------------------------------------------------------ hub streams


def hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether the Hugging Face hub (or $HF_ENDPOINT) answers a connection; never with HF_HUB_OFFLINE."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def open_stream(config: DataConfig) -> datasets.IterableDataset:
    import datasets

    datasets.disable_progress_bars()
    name = config.source.removeprefix("hf:")
    try:
        stream = datasets.load_dataset(name, config.hf_config, split="train", streaming=True)
    except Exception as err:  # datasets raises many kinds; the user needs the one line
        raise ConfigError(f"data.source {config.source!r} cannot be opened: {err}") from None
    if config.text_field not in (stream.column_names or [config.text_field]):
        raise ConfigError(f"data.text_field {config.text_field!r} is not a column of {name}")
    return stream


def stream_texts(stream: datasets.IterableDataset, text_field: str, limit: int) -> list[str]:
    return [row[text_field] for row in stream.take(limit)]


class StreamLoader:
    """Packs a tokenized document stream into batches; its state is the stream's plus the carry."""

    def __init__(
        self,
        stream: datasets.IterableDataset,
        tokenizer: Tokenizer,
        text_field: str,
        batch_size: int,
        seq_len: int,
    ):
        self.stream, self.tokenizer, self.text_field = stream, tokenizer, text_field
        self.batch_size, self.seq_len = batch_size, seq_len
        self.epoch = 0
        self._carry = np.empty(0, dtype=np.int64)
        self._rows: Iterator[dict[str, Any]] = iter(self.stream)

    def next_batch(self) -> torch.Tensor:
        need = self.batch_size * (self.seq_len + 1)
        parts, have = [self._carry], len(self._carry)
        while have < need:
            tokens = np.append(self.tokenizer.encode([self._next_row()[self.text_field]])[0], self.tokenizer.eos_id)
            parts.append(tokens)
            have += len(tokens)
        flat = np.concatenate(parts).astype(np.int64)
        self._carry = flat[need:]
        return torch.from_numpy(flat[:need].reshape(self.batch_size, self.seq_len + 1))

    def skip(self, batches: int) -> None:
        """Move on by `batches`: read and dropped (a stream has no other way forward)."""
        for _ in range(batches):
            self.next_batch()

    def _next_row(self) -> dict[str, Any]:
        for _ in range(2):
            try:
                return next(self._rows)
            except StopIteration:
                self.epoch += 1
                self.stream.set_epoch(self.epoch)
                self._rows = iter(self.stream)
        raise ConfigError("data.source holds no documents for this rank")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "stream": self.stream.state_dict(), "carry": torch.from_numpy(self._carry.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.stream.set_epoch(self.epoch)
        self.stream.load_state_dict(state["stream"])
        self._rows = iter(self.stream)
        self._carry = state["carry"].numpy().astype(np.int64)


def eval_batches(eval_sequences: np.ndarray, batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """A fixed eval set: `batches` batches drawn without replacement from the held-out sequences."""
    order = np.random.default_rng([seed, 0xE7A1]).permutation(len(eval_sequences))
    take = order[: batches * batch_size]
    if len(take) == 0:
        raise ConfigError("the held-out eval split is empty; raise data.eval_fraction or use more data")
    rows = eval_sequences[np.sort(take)].astype(np.int64)
    return [torch.from_numpy(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


# ------------------------------------------------------------------------- one rank's data


class Prefetcher:
    """A loader's next `depth` batches made on a background thread, so the step does not wait for
    them (a stream's tokenization above all). The batches and their order are the loader's own; the
    state is the loader's as of the last batch handed out, so a checkpoint resumes exactly there."""

    def __init__(self, loader: ShardLoader | StreamLoader, depth: int):
        self.loader, self.depth = loader, depth
        self._state = loader.state_dict()  # as of the last batch handed out
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def next_batch(self) -> torch.Tensor:
        if self._thread is None:
            self._queue, self._stop = queue.Queue(self.depth), threading.Event()
            self._thread = threading.Thread(target=self._fill, name="prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        batch, self._state = item
        return batch

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                item = (self.loader.next_batch(), self.loader.state_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # raised in the step that asks for the batch
            self._queue.put(err)

    def _rewind(self) -> None:
        """Stop making batches; the loader back where the last batch handed out left it."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.loader.load_state_dict(self._state)

    def skip(self, batches: int) -> None:
        self._rewind()
        self.loader.skip(batches)
        self._state = self.loader.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rewind()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        self._rewind()
        if isinstance(self.loader, ShardLoader):
            self.loader.load_resharded(states)
        else:  # a stream continues from the region's first rank's position
            self.loader.load_state_dict(states[0])
        self._state = self.loader.state_dict()


@dataclass
class RankData:
    loader: ShardLoader | StreamLoader | ClientShards | Prefetcher
    eval_batches: list[torch.Tensor]


def tokenizer_training_texts(config: DataConfig) -> list[str]:
    if config.source.startswith("hf:"):
        stream = open_stream(config)
        return stream_texts(stream.skip(config.eval_docs), config.text_field, config.bpe_train_docs)
    return [text for _, text in load_domains(config)]


def load_rank_data(
    config: DataConfig,
    tokenizer: Tokenizer,
    *,
    seed: int,
    batch_size: int,
    seq_len: int,
    eval_batch_count: int,
    regions: int,
    ranks_per_region: int,
    rank: int,
    grad_accum: int = 1,
) -> RankData:
    """The training loader of one rank (an inner step's rows at a time: `grad_accum` micro-batches
    of `batch_size`; `config.prefetch` of them made ahead) and the (shared) eval set (of
    `batch_size` batches)."""
    step_rows = batch_size * grad_accum
    if config.source.startswith("hf:"):
        from datasets.distributed import split_dataset_by_node

        stream = open_stream(config)
        held_out = tokenizer.encode(stream_texts(stream, config.text_field, config.eval_docs))
        tokens = np.concatenate([np.append(t, tokenizer.eos_id) for t in held_out] or [np.empty(0, np.int32)])
        evals = eval_batches(cut_sequences(tokens, seq_len), eval_batch_count, batch_size, seed)
        mine = split_dataset_by_node(stream.skip(config.eval_docs), rank=rank, world_size=regions * ranks_per_region)
        return RankData(_ahead(StreamLoader(mine, tokenizer, config.text_field, step_rows, seq_len), config), evals)
    corpus = build_corpus(load_domains(config), tokenizer, seq_len, config.eval_fraction)
    shards = region_shards(corpus.sequence_domain, regions, config.split, config.dirichlet_alpha, seed)
    mine = shards[rank // ranks_per_region][rank % ranks_per_region :: ranks_per_region]
    loader = ShardLoader(corpus.sequences, mine, step_rows, seed=[seed, rank])
    return RankData(_ahead(loader, config), eval_batches(corpus.eval_sequences, eval_batch_count, batch_size, seed))


def _ahead(loader: ShardLoader | StreamLoader, config: DataConfig) -> ShardLoader | StreamLoader | Prefetcher:
    return Prefetcher(loader, config.prefetch) if config.prefetch else loader


# ------------------------------------------------------------------------- federated clients


class ClientShards:
    """Every federated client's disjoint shard of a local corpus (dealt like regions' shards), and
    how many batches each has drawn: a client's next round continues its own epoch order."""

    def __init__(
        self,
        sequences: np.ndarray,
        shards: list[np.ndarray],
        batch_size: int,
        seed: int,
        sequence_domain: np.ndarray | None = None,
    ):
        self.sequences, self.shards, self.batch_size, self.seed = sequences, shards, batch_size, seed
        self.sequence_domain = np.zeros(len(sequences), dtype=np.int64) if sequence_domain is None else sequence_domain
        self.batches_done = [0] * len(shards)
        for client, shard in enumerate(shards):
            if len(shard) < batch_size:
                ShardLoader(sequences, shard, batch_size, [seed, client], owner=f"federated client {client}")

    def examples(self, client: int) -> int:
        """The sequences in the client's shard: its weight in FedAvg."""
        return len(self.shards[client])

    def domain_histograms(self) -> np.ndarray:
        """(clients, domains): how many of each client's sequences come from each domain (book)."""
        domains = int(self.sequence_domain.max()) + 1
        return np.stack([np.bincount(self.sequence_domain[shard], minlength=domains) for shard in self.shards])

    def loader(self, client: int) -> ShardLoader:
        """The client's loader, where its last round left it."""
        loader = ShardLoader(self.sequences, self.shards[client], self.batch_size, [self.seed, 0xC1, client])
        per_epoch = len(self.shards[client]) // self.batch_size
        done = self.batches_done[client]
        loader.load_state_dict({"epoch": done // per_epoch, "position": (done % per_epoch) * self.batch_size})
        return loader

    def state_dict(self) -> dict[str, list[int]]:
        return {"batches_done": list(self.batches_done)}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        self.batches_done = [int(n) for n in state["batches_done"]]


def load_client_data(
    config: DataConfig,
    tokenizer: Tokenizer,
    *,
    clients: int,
    seed: int,
    batch_size: int,
    seq_len: int,
    eval_batch_count: int,
) -> tuple[ClientShards, list[torch.Tensor]]:
    """The clients' shards (non_iid: the corpus's domains dealt by Dirichlet(data.dirichlet_alpha))
    and the shared eval set."""
    corpus = build_corpus(load_domains(config), tokenizer, seq_len, config.eval_fraction)
    shards = region_shards(corpus.sequence_domain, clients, config.split, config.dirichlet_alpha, seed)
    evals = eval_batches(corpus.eval_sequences, eval_batch_count, batch_size, seed)
    return ClientShards(corpus.sequences, shards, batch_size, seed, corpus.sequence_domain), evals
