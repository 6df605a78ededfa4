"""`rwkvkit prepare`: jsonl / plain text / chat jsonl -> RWKV-LM compatible `.bin/.idx` (+ loss mask + JSON sidecar).

Pass 1 streams the inputs in ~1 MiB tasks through this process and worker processes (parse, render chat, tokenize,
check the round trip) and appends the results, in input order, to a staging binidx. Pass 2 writes the `--repeat`
copies, each in its own seeded shuffle of the documents, by copying from the memory-mapped staging file. Memory
stays bounded by the number of documents, never by the data. Every file is written under a `*.tmp-PID` name and
renamed at the very end, `.idx` last, so an interrupted run leaves nothing that a reader would take for a finished
dataset.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from rwkvkit.data.binidx import BinIdxDataset, BinIdxWriter, token_dtype, write_index
from rwkvkit.data.chat import ChatFormatError, ChatTemplate, record_messages
from rwkvkit.data.sampler import magic_prime, prime_ratio_ok
from rwkvkit.errors import ConfigError, DataError

EOS = 0  # RWKV's end-of-document token, appended after every document
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")  # what a folder contributes besides jsonl
TASK_BYTES = 1 << 20  # input bytes per worker task; also the piece size of large text files
AUTO_WORKER_BYTES = 8 << 20  # input per core from which --workers defaults to one process per core
PIPE_BYTES = 1 << 20  # the pipes to and from the worker processes (Linux; see _widen_pipes)
CHECK_SLICE = 1 << 15  # tokens per step of the round-trip check (its temporaries then fit in the cache)
MAX_REPORTED = 10  # bad records printed one by one with --skip-bad; the rest are only counted


@dataclass(frozen=True)
class RecordOptions:
    """How one jsonl record becomes a document (shared with the worker processes)."""

    fmt: Literal["auto", "text", "chat"] = "auto"
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    template: ChatTemplate = field(default_factory=ChatTemplate)


@dataclass
class PrepareResult:
    prefix: Path
    n_tokens: int  # in the written .bin (all repeats): RWKV-LM's my_exit_tokens
    n_items: int
    n_documents: int  # distinct input documents kept (before --repeat)
    repeat: int
    n_skipped: int
    has_mask: bool
    n_trained: int  # tokens whose loss mask is 1 (all of them without a mask)
    dtype: str
    ctx_len: int | None = None
    magic_prime: int | None = None


class _BadRecord(Exception):
    def __init__(self, reason: str, line_offset: int = 0):
        super().__init__(reason)
        self.reason, self.line_offset = reason, line_offset


# --------------------------------------------------------------------------------------------------- inputs


def find_inputs(paths: list[str | Path]) -> list[tuple[Path, str]]:
    """(file, "jsonl" | "text") for every input; folders are walked in sorted order for jsonl and text files."""
    found: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            before = len(found)
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    suffix = Path(name).suffix.lower()
                    if name.startswith("."):
                        continue
                    if suffix in JSONL_SUFFIXES:
                        found.append((Path(root) / name, "jsonl"))
                    elif suffix in TEXT_SUFFIXES:
                        found.append((Path(root) / name, "text"))
            if len(found) == before:
                exts = ", ".join(JSONL_SUFFIXES + TEXT_SUFFIXES)
                raise DataError(f"{p}: no input files in this folder (looked for {exts})")
        elif p.is_file():
            found.append((p, "jsonl" if p.suffix.lower() in JSONL_SUFFIXES else "text"))
        else:
            raise DataError(f"{p}: no such file or directory")
    return found


@dataclass
class _Task:
    """Records of one file: (line number, raw bytes, ends a document). jsonl: one line per record; text: pieces."""

    file_no: int
    kind: str
    records: list[tuple[int, bytes, bool]]
    n_bytes: int


def _read_tasks(files: list[tuple[Path, str]], task_bytes: int) -> Iterator[_Task]:
    for file_no, (path, kind) in enumerate(files):
        records, size = [], 0
        for rec in _jsonl_records(path) if kind == "jsonl" else _text_records(path, task_bytes):
            records.append(rec)
            size += len(rec[1])
            if size >= task_bytes:
                yield _Task(file_no, kind, records, size)
                records, size = [], 0
        if records:
            yield _Task(file_no, kind, records, size)


def _jsonl_records(path: Path):
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte order mark, as some Windows editors write
            if line.strip():  # blank lines are not records (as in make_data.py)
                yield lineno, line, True


def _text_records(path: Path, piece_bytes: int):
    """A text file is one document, read in pieces cut after a newline (or between UTF-8 characters); only the
    last piece ends the document. An empty file yields one empty piece, which is then reported as bad."""
    lineno, pending, carry = 1, None, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(piece_bytes)
            data = carry + chunk
            cut = (data.rfind(b"\n") + 1 or _utf8_cut(data)) if chunk else len(data)
            piece, carry = data[:cut], data[cut:]
            if piece:
                if pending is not None:
                    yield pending[0], pending[1], False
                pending = (lineno, piece)
                lineno += piece.count(b"\n")
            if not chunk:
                break
    yield (pending[0], pending[1], True) if pending is not None else (1, b"", True)


def _utf8_cut(data: bytes) -> int:
    """A cut point that does not split a UTF-8 sequence (for text without newlines)."""
    k = len(data)
    while k > 0 and len(data) - k < 4 and (data[k - 1] & 0xC0) == 0x80:
        k -= 1
    if k > 0 and data[k - 1] >= 0xC0:
        k -= 1
    return k or len(data)


# --------------------------------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_spec, options: RecordOptions, in_process: bool = False, shares_cores: bool = True):
    if not in_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
        # The processes are the parallelism: a native tokenizer's own thread pool would only oversubscribe. And a
        # forked process may hold a copy of this process's tokenizer (loaded by an earlier call), whose thread pool,
        # if it had started, has no threads in the copy: it must never be used (one text at a time never does).
        os.environ["RAYON_NUM_THREADS"] = "1"
    tok = _resolve_tokenizer(tokenizer_spec)
    # Alone, a process encodes with encode_batch (a native one uses all cores); where processes share the cores,
    # one text at a time, which is also a little faster on one core.
    one_by_one = not hasattr(tok, "encode_batch") or (shares_cores and hasattr(tok, "encode"))
    _WORKER.update(tokenizer=tok, options=options, dtype=token_dtype(int(tok.vocab_size)),
                   byte_table=_byte_table(tok), one_by_one=one_by_one)


def _widen_pipes(pool) -> None:
    """Let a whole task or result sit in the pipes between the processes (Linux: 1 MiB instead of 64 KiB). The
    executor's threads in this process move them in pipe-sized steps, and each step waits for this process's main
    thread to let go of the GIL, which the native tokenizer holds while it encodes: with the default pipes the
    other processes idle a fifth of the time."""
    try:
        import fcntl

        for queue in (pool._call_queue, pool._result_queue):
            fcntl.fcntl(queue._reader.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass  # another system or Python version: the same results, a little slower


def _can_fork() -> bool:
    """Forking is safe on Linux while this process runs no other Python thread (one could hold a lock that the
    child would then wait on forever). Native threads are harmless here: OpenBLAS re-creates its own after a fork,
    and a worker never uses the native tokenizer's thread pool (see _init_worker)."""
    import multiprocessing as mp
    import threading

    return sys.platform == "linux" and "fork" in mp.get_all_start_methods() and threading.active_count() == 1


def _worker_vocab_size() -> int:
    return int(_WORKER["tokenizer"].vocab_size)


def _resolve_tokenizer(spec):
    if isinstance(spec, str):
        from rwkvkit.tokenizer import get_tokenizer

        return get_tokenizer(spec)
    return spec


def _decode_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_offset = raw.count(b"\n", 0, e.start)
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise _BadRecord(f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {col})", line_offset) from None


def _parse_record(text: str, opt: RecordOptions) -> tuple[list[tuple[str, bool]], bool]:
    """A jsonl line -> (segments [(text, trained)], is_chat)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _BadRecord(f"malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    chat_fields = "messages" in obj or (opt.prompt_field in obj and opt.response_field in obj)
    if opt.fmt == "chat" or (opt.fmt == "auto" and chat_fields and opt.text_field not in obj):
        if not chat_fields:
            raise _BadRecord(f"missing field 'messages' (or '{opt.prompt_field}' + '{opt.response_field}')")
        try:
            return opt.template.segments(record_messages(obj, opt.prompt_field, opt.response_field)), True
        except ChatFormatError as e:
            raise _BadRecord(str(e)) from None
    if opt.text_field not in obj:
        hint = "" if opt.fmt == "text" else f" (nor 'messages' / '{opt.prompt_field}' + '{opt.response_field}')"
        raise _BadRecord(f"missing field '{opt.text_field}'{hint}")
    value = obj[opt.text_field]
    if not isinstance(value, str):
        raise _BadRecord(f"field '{opt.text_field}' must be a string, got {type(value).__name__}")
    return [(value, True)], False


def _process(task: _Task) -> list[tuple]:
    """Task -> per record (line, tokens, mask or None (text: all trained), ends_doc, error or None), in order."""
    tok, opt, dtype = _WORKER["tokenizer"], _WORKER["options"], _WORKER["dtype"]
    parsed: list[tuple] = []  # (line, segments, ends_doc, is_chat, UTF-8 of the segments) or (line, error, ends_doc)
    for lineno, raw, ends_doc in task.records:
        try:
            if not raw:
                raise _BadRecord("empty document")
            text = _decode_utf8(raw)
            segments, is_chat = _parse_record(text, opt) if task.kind == "jsonl" else ([(text, True)], False)
            utf8 = []
            for seg, _ in segments:
                if not seg:
                    raise _BadRecord("empty document")
                try:
                    utf8.append(seg.encode("utf-8"))
                except UnicodeEncodeError as e:
                    raise _BadRecord(f"text is not valid Unicode (lone surrogate {seg[e.start]!r})") from None
            parsed.append((lineno, segments, ends_doc, is_chat, utf8))
        except _BadRecord as e:
            parsed.append((lineno + e.line_offset, e.reason, ends_doc))

    good = [p for p in parsed if len(p) == 5]
    texts = [seg for p in good for seg, _ in p[1]]
    seg_ids = [tok.encode(t) for t in texts] if _WORKER["one_by_one"] else tok.encode_batch(texts)
    seg_sizes = np.fromiter(map(len, seg_ids), dtype=np.int64, count=len(seg_ids))
    seg_ends = np.cumsum(seg_sizes)
    flat = np.fromiter(chain.from_iterable(seg_ids), dtype=dtype, count=int(seg_ends[-1]) if len(seg_ends) else 0)
    all_match = _round_trip_matches(flat, seg_ends, [b for p in good for b in p[4]])

    out, k = [], 0  # k: the record's first segment
    for p in parsed:
        if len(p) == 3:
            out.append((p[0], None, None, p[2], p[1]))
            continue
        lineno, segments, ends_doc, is_chat, _ = p
        start, end = (int(seg_ends[k - 1]) if k else 0), int(seg_ends[k + len(segments) - 1])
        if not all_match and tok.decode(flat[start:end].tolist()) != "".join(s for s, _ in segments):
            out.append((lineno, None, None, ends_doc, "tokenizer round trip failed: decode(encode(text)) != text"))
            k += len(segments)
            continue
        tokens = np.empty(end - start + ends_doc, dtype=dtype)
        tokens[: end - start] = flat[start:end]
        mask = None
        if is_chat:
            mask = np.empty(len(tokens), dtype=np.uint8)
            pos = 0
            for (_, trained), n in zip(segments, seg_sizes[k : k + len(segments)].tolist()):
                mask[pos : pos + n] = trained
                pos += n
        if ends_doc:
            tokens[-1] = EOS
            if mask is not None:
                mask[-1] = segments[-1][1]  # train on the end token only after an answer
        out.append((lineno, tokens, mask, ends_doc, None))
        k += len(segments)
    return out


def _round_trip_matches(flat: np.ndarray, seg_ends: np.ndarray, seg_utf8: list[bytes]) -> bool:
    """True when every segment's tokens decode to exactly its UTF-8 bytes, checked for all segments of a task at
    once: each segment's byte count is equal, and each token's bytes equal the text's bytes where it starts. False
    means "check one by one" (also for tokenizers without a byte table), so `decode(ids) == text` stays the judge."""
    table = _WORKER.get("byte_table")
    if table is None or len(flat) == 0 or not (np.diff(seg_ends, prepend=0) > 0).all():
        return False
    lengths, words, masks = table
    if int(flat.min()) < 0 or int(flat.max()) >= len(lengths):
        return False
    token_len = lengths[flat]
    if token_len.min() < 0:  # an id that does not decode: decode() itself says so
        return False
    byte_ends = np.cumsum(token_len, dtype=np.int64)
    if not np.array_equal(byte_ends[seg_ends - 1], np.cumsum([len(b) for b in seg_utf8])):
        return False
    # Compare 8 bytes at a time: the text read as a little-endian uint64 at every byte offset, masked to the
    # token's length, against the token's own bytes in the same form (long tokens take several words). In slices
    # of tokens, so the temporaries stay in the cache.
    text = b"".join(seg_utf8) + bytes(8 * len(words))
    windows = np.ndarray((len(text) - 7,), dtype="<u8", buffer=text, strides=(1,))
    for first in range(0, len(flat), CHECK_SLICE):
        ids = flat[first : first + CHECK_SLICE].astype(np.intp)
        n_bytes = token_len[first : first + CHECK_SLICE]
        starts = byte_ends[first : first + CHECK_SLICE] - n_bytes
        if not np.array_equal(windows[starts] & masks[0][ids], words[0][ids]):
            return False
        longer = np.flatnonzero(n_bytes > 8)
        for w in range(1, len(words)):
            longer = longer[n_bytes[longer] > 8 * w]
            if not len(longer):
                break
            sel = ids[longer]
            if not np.array_equal(windows[starts[longer] + 8 * w] & masks[w][sel], words[w][sel]):
                return False
    return True


def _byte_table(tok):
    """For a tokenizer whose `decode` is the UTF-8 of `decode_bytes` (every rwkvkit tokenizer), else None: per id
    its byte length (-1: does not decode), its bytes as little-endian uint64 words (zero-padded) and the masks that
    keep a word's valid bytes, as lists with one array per word position (contiguous: fast gathers)."""
    from rwkvkit.tokenizer.base import Tokenizer

    if not isinstance(tok, Tokenizer) or type(tok).decode is not Tokenizer.decode:
        return None
    table = tok._id_to_bytes  # what decode_bytes looks ids up in (the base class's contract with its subclasses)
    pieces = list(map(table.get, range(int(tok.vocab_size))))
    lengths = np.array([-1 if b is None else len(b) for b in pieces], dtype=np.int32)
    n_words = max(1, -(-int(lengths.max()) // 8))
    # Every token's bytes into its zero-padded row, all at once: byte k of the blob goes to (its token, its offset)
    sizes = np.maximum(lengths, 0)
    token_of_byte = np.repeat(np.arange(len(pieces)), sizes)
    offset_of_byte = np.arange(len(token_of_byte)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    rows = np.zeros((len(pieces), 8 * n_words), dtype=np.uint8)
    rows[token_of_byte, offset_of_byte] = np.frombuffer(b"".join(b for b in pieces if b), dtype=np.uint8)
    valid = np.zeros_like(rows)
    valid[token_of_byte, offset_of_byte] = 0xFF
    words, masks = rows.view("<u8"), valid.view("<u8")  # (ids, n_words)
    return lengths, list(words.T.copy()), list(masks.T.copy())


class _Tokenizing:
    """Runs `_process` over tasks, in input order, in `workers` processes: this one and `workers - 1` others,
    started first so that they load their tokenizers while this process loads its own. This process takes a task
    itself whenever the others have enough queued. At most 2 tasks per other process are queued, so memory stays
    bounded whatever the input size.

    The others are forked where that is safe (see _can_fork), which spares them the imports of a spawned process.
    Forked before any tokenizer is loaded, each builds its own: sharing this process's copy would cost more than
    it saves, as every page either process then writes (Python's reference counts touch many) is copied, and
    freeing the native World engine (250 MB) at exit faults on all of its pages."""

    def __init__(self, tokenizer_spec, options: RecordOptions, workers: int):
        self.n_others, self.pool = max(workers - 1, 0), None
        if self.n_others:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            context = mp.get_context("fork" if _can_fork() else "spawn")
            self.pool = ProcessPoolExecutor(self.n_others, mp_context=context, initializer=_init_worker,
                                            initargs=(tokenizer_spec, options))
            with warnings.catch_warnings():
                # Python 3.12+ warns about forking while any thread runs; see _can_fork for why these are harmless
                warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks",
                                        category=DeprecationWarning)
                # one call per worker starts them all now (the executor starts processes only while none is idle)
                for _ in range(self.n_others):
                    self.pool.submit(_worker_vocab_size)
            _widen_pipes(self.pool)
        try:
            _init_worker(tokenizer_spec, options, in_process=True, shares_cores=self.pool is not None)
        except BaseException:
            self.close()
            raise
        self.vocab_size = _worker_vocab_size()

    def run(self, tasks: Iterator[_Task]) -> Iterator[tuple[_Task, list]]:
        if self.pool is None:
            for task in tasks:
                yield task, _process(task)
            return
        pending: deque = deque()  # (task, its future in the pool, or its results when this process did it)
        for task in tasks:
            queued = sum(isinstance(r, Future) and not r.done() for _, r in pending)
            if queued < 2 * self.n_others:
                pending.append((task, self.pool.submit(_process, task)))
            else:
                pending.append((task, _process(task)))
            while pending and (not isinstance(pending[0][1], Future) or pending[0][1].done()
                               or len(pending) > 4 * self.n_others + 2):
                task0, r = pending.popleft()
                yield task0, r.result() if isinstance(r, Future) else r
        while pending:
            task0, r = pending.popleft()
            yield task0, r.result() if isinstance(r, Future) else r

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# --------------------------------------------------------------------------------------------------- output


class _Outputs:
    """The temporary files of one run, renamed into place by `commit` or deleted by `discard`."""

    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.made: list[Path] = []

    def final(self, ext: str) -> Path:
        return Path(f"{self.prefix}{ext}")

    def temp(self, ext: str) -> Path:
        # the suffix comes after the extension, so no leftover ever looks like a .bin/.idx pair
        path = Path(f"{self.prefix}{ext}.tmp-{os.getpid()}")
        self.made.append(path)
        return path

    def discard(self) -> None:
        for path in self.made:
            path.unlink(missing_ok=True)

    def commit(self, files: dict[str, Path]) -> None:
        """Rename {final extension: temporary file} into place. Readers look for PREFIX.idx: the old one goes
        first and the new one comes last, so no moment exists where an index sits beside data it does not
        describe; stale mask and sidecar files of an earlier run go too."""
        for ext in (".idx", ".mask.idx", ".json", ".mask.bin"):
            self.final(ext).unlink(missing_ok=True)
        for ext in sorted(files, key=lambda e: (e.endswith(".idx"), e == ".idx")):
            os.replace(files[ext], self.final(ext))
        self.discard()  # staging files


def _write_repeats(src: BinIdxDataset, bin_path: Path, idx_path: Path, perms: list[np.ndarray]) -> int:
    """Write the documents of `src` once per permutation, in that order; returns the item count."""
    first_item = src.doc_idx[:-1]
    items_per_doc = np.diff(src.doc_idx)
    starts, ends = src.document_spans()
    order = np.concatenate(perms) if perms else np.zeros(0, np.int64)
    counts = items_per_doc[order]
    # item numbers of the output, document after document: first_item[d] + 0 .. count-1
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    items = np.repeat(first_item[order], counts) + (np.arange(int(counts.sum())) - offsets)
    with open(bin_path, "wb", buffering=1 << 22) as f:
        tokens = src.tokens
        for d in order.tolist():
            f.write(tokens[starts[d] : ends[d]].tobytes())
    write_index(idx_path, src.dtype, src.sizes[items], np.concatenate([[0], np.cumsum(counts)]))
    return len(items)


# --------------------------------------------------------------------------------------------------- driver


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _Stage:
    """Pass 1's output: tokens in input order, and the loss mask, which is started only when the first chat record
    arrives (earlier documents are then backfilled with ones) so plain-text corpora never pay for it."""

    def __init__(self, outputs: _Outputs, dtype):
        self.bin, self.idx = outputs.temp(".stage.bin"), outputs.temp(".stage.idx")
        self.mask_bin, self.mask_idx = outputs.temp(".stage.mask.bin"), outputs.temp(".stage.mask.idx")
        self.tokens = BinIdxWriter(self.bin, dtype)
        self.masks: BinIdxWriter | None = None

    def add(self, tokens: np.ndarray, mask: np.ndarray | None, ends_doc: bool) -> None:
        if mask is not None and self.masks is None:
            self._start_masks()
        self.tokens.add_item(tokens)
        if self.masks is not None:
            self.masks.add_item(mask if mask is not None else np.ones(len(tokens), np.uint8))
        if ends_doc:
            self.end_document()

    def _start_masks(self) -> None:
        self.masks = BinIdxWriter(self.mask_bin, np.uint8)
        ends = set(self.tokens.doc_idx[1:].tolist())
        for k, n in enumerate(self.tokens.sizes.tolist(), 1):
            self.masks.add_item(np.ones(n, np.uint8))
            if k in ends:
                self.masks.end_document()

    def end_document(self) -> None:
        self.tokens.end_document()
        if self.masks is not None:
            self.masks.end_document()

    def discard_document(self) -> None:
        self.tokens.discard_document()
        if self.masks is not None:
            self.masks.discard_document()

    def finish(self) -> tuple[BinIdxDataset, BinIdxDataset | None]:
        self.tokens.finish(self.idx)
        if self.masks is not None:
            self.masks.finish(self.mask_idx)
        mask = BinIdxDataset(bin_path=self.mask_bin, idx_path=self.mask_idx) if self.masks is not None else None
        return BinIdxDataset(bin_path=self.bin, idx_path=self.idx), mask


def prepare(
    inputs: list[str | Path],
    out: str | Path,
    tokenizer: Any = "world",
    repeat: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    ctx_len: int | None = None,
    options: RecordOptions | None = None,
    skip_bad: bool = False,
    workers: int | None = None,
    progress: bool = True,
    log=print,
) -> PrepareResult:
    """Tokenize `inputs` into `out`.bin/.idx (+ `out`.mask.bin/.idx for chat data, + `out`.json).

    `tokenizer` is a name for `rwkvkit.tokenizer.get_tokenizer` or an object with encode/decode/vocab_size (it must
    pickle when workers > 1). Raises DataError for bad input (unless skip_bad) or too little data for ctx_len.
    """
    options = options or RecordOptions()
    if repeat < 1:
        raise ConfigError(f"--repeat must be at least 1, got {repeat}")
    if ctx_len is not None and ctx_len < 1:
        raise ConfigError(f"--ctx-len must be positive, got {ctx_len}")
    prefix = Path(str(out))
    for ext in (".bin", ".idx"):
        if prefix.name.endswith(ext):
            prefix = prefix.with_name(prefix.name[: -len(ext)])
    sources = find_inputs(inputs)
    total_bytes = sum(p.stat().st_size for p, _ in sources)
    if workers is None:
        # A spawned worker takes a second or so to start (this process works meanwhile), and alone this process's
        # native tokenizer already encodes on all cores: more processes pay off from a second of work per core.
        cores = _default_workers()
        workers = cores if total_bytes >= cores * AUTO_WORKER_BYTES else 1
    task_bytes = max(16 << 10, min(TASK_BYTES, total_bytes // (4 * workers) + 1))
    prefix.parent.mkdir(parents=True, exist_ok=True)

    outputs = _Outputs(prefix)
    engine = None
    try:
        engine = _Tokenizing(tokenizer, options, workers)
        dtype = token_dtype(engine.vocab_size)
        stage = _Stage(outputs, dtype)
        n_skipped = _tokenize(sources, task_bytes, total_bytes, engine, stage, skip_bad, progress)
        engine.close()
        tokens, masks = stage.finish()
        n_docs = tokens.num_documents
        if n_docs == 0:
            raise DataError("no documents to write" + (f" ({n_skipped} bad records skipped)" if n_skipped else ""))
        n_tokens = tokens.num_tokens * repeat
        prime = magic_prime(n_tokens, ctx_len) if ctx_len is not None else None  # raises if data < 3*ctx_len

        has_mask = masks is not None
        n_trained = int(np.count_nonzero(masks.tokens)) * repeat if has_mask else n_tokens
        pairs = [(tokens, "")] + ([(masks, ".mask")] if has_mask else [])
        files: dict[str, Path] = {}  # final extension -> the temporary file to rename
        if repeat == 1 and not shuffle:  # the staging files are the result
            for ds, name in pairs:
                files[name + ".bin"], files[name + ".idx"] = ds.bin_path, ds.idx_path
            n_items = len(tokens)
        else:
            rng = np.random.default_rng(seed)
            perms = [rng.permutation(n_docs) if shuffle else np.arange(n_docs) for _ in range(repeat)]
            for ds, name in pairs:
                files[name + ".bin"], files[name + ".idx"] = outputs.temp(name + ".bin"), outputs.temp(name + ".idx")
                n_items = _write_repeats(ds, files[name + ".bin"], files[name + ".idx"], perms)
        del tokens, masks, pairs  # close the memory maps before the files are renamed or removed

        result = PrepareResult(prefix, n_tokens, n_items, n_docs, repeat, n_skipped, has_mask, n_trained,
                               dtype.name, ctx_len, prime)
        sidecar = {
            "format": "binidx (MMIDIDX v1, RWKV-LM compatible)",
            "tokenizer": tokenizer if isinstance(tokenizer, str) else type(tokenizer).__name__,
            "vocab_size": engine.vocab_size,
            "dtype": dtype.name,
            "eos_token": EOS,
            "tokens": n_tokens,
            "items": n_items,
            "documents": n_docs,
            "repeat": repeat,
            "shuffle": shuffle,
            "seed": seed,
            "skipped": n_skipped,
            "inputs": [str(p) for p, _ in sources],
            "mask": ({"file": prefix.name + ".mask", "meaning": "1 = token is a training target", "dtype": "uint8",
                      "trained_tokens": n_trained} if has_mask else None),
            "ctx_len": ctx_len,
            "magic_prime": prime,
            "my_exit_tokens": n_tokens,
        }
        files[".json"] = outputs.temp(".json")
        files[".json"].write_text(json.dumps(sidecar, indent=2) + "\n")
        outputs.commit(files)
    except BaseException:
        if engine is not None:
            engine.close()
        outputs.discard()
        raise
    _report(result, log)
    return result


def _tokenize(files, task_bytes: int, total_bytes: int, engine: _Tokenizing, stage: _Stage, skip_bad: bool,
              progress: bool) -> int:
    """Pass 1: all inputs into the stage, in order. Returns the number of bad records skipped."""
    from tqdm import tqdm

    class Bar(tqdm):
        # tqdm's monitor thread, once started, outlives the bar; a later call here would then not fork its workers
        monitor_interval = 0

    n_skipped, dropping = 0, False
    with Bar(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None if progress else True,
              file=sys.stderr) as bar:
        for task, results in engine.run(_read_tasks(files, task_bytes)):
            source = files[task.file_no][0]
            for lineno, tokens, mask, ends_doc, error in results:
                if dropping:  # the rest of a text file whose earlier piece was bad
                    dropping = not ends_doc
                    continue
                if error is not None:
                    stage.discard_document()
                    if not skip_bad:
                        raise DataError(f"{source}:{lineno}: {error} (use --skip-bad to skip bad records)")
                    if n_skipped < MAX_REPORTED:
                        bar.write(f"skipped {source}:{lineno}: {error}", file=sys.stderr)
                    n_skipped += 1
                    dropping = not ends_doc
                    continue
                stage.add(tokens, mask, ends_doc)
            bar.update(task.n_bytes)
        bar.update(total_bytes - bar.n)  # blank jsonl lines are in no task
    return n_skipped


def _report(r: PrepareResult, log) -> None:
    name = r.prefix
    log(f"### Final {name}.bin/idx has {r.n_tokens} tokens, {r.n_items} items. Dtype {r.dtype}")
    copies = f", written {r.repeat} times" if r.repeat > 1 else ""
    log(f"### {r.n_documents} input documents{copies}" + (f"; {r.n_skipped} bad records skipped" if r.n_skipped else ""))
    if r.has_mask:
        log(f"### loss mask {name}.mask.bin/idx: {r.n_trained} of {r.n_tokens} tokens are training targets")
    if r.magic_prime is not None:
        log(f"\n### magic_prime = {r.magic_prime} (for ctxlen {r.ctx_len})\n")
        log(f"--my_exit_tokens {r.n_tokens} --magic_prime {r.magic_prime} --ctx_len {r.ctx_len}")
        if not prime_ratio_ok(r.magic_prime, r.n_tokens, r.ctx_len):
            log(f"note: RWKV-LM's trainer asserts 0.9 < magic_prime / (tokens // ctx_len) <= 1, which this small "
                f"dataset fails ({r.magic_prime} / {r.n_tokens // r.ctx_len}); use more data or --repeat")


# --------------------------------------------------------------------------------------------------- CLI


def _parser():
    from typing import Optional

    from jsonargparse import ActionYesNo, ArgumentParser

    p = ArgumentParser(
        prog="rwkvkit prepare",
        description="Tokenize jsonl / text / chat files into RWKV-LM compatible binidx (.bin/.idx) files and print "
        "the --my_exit_tokens and --magic_prime a training run needs.",
    )
    p.add_argument("inputs", nargs="+", help="jsonl files, text files, or folders of them")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json "
                   "(and PREFIX.mask.bin/.idx for chat data)")
    p.add_argument("--tokenizer", default="world",
                   help="world, neox, or the path of a vocab file (.json: a NeoX/HF tokenizer)")
    p.add_argument("--repeat", type=int, default=1, help="write the data N times, each copy shuffled anew")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffles (same seed, same output)")
    p.add_argument("--shuffle", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="shuffle the documents of each copy (--no-shuffle keeps the input order)")
    p.add_argument("--ctx-len", type=Optional[int], default=None,
                   help="print magic_prime and my_exit_tokens for this context length")
    p.add_argument("--format", type=Literal["auto", "text", "chat"], default="auto",
                   help="jsonl records: auto (the text field if present, else chat from 'messages' or "
                   "prompt+response), text, or chat")
    p.add_argument("--field", default="text", help="the jsonl field that holds a document's text")
    p.add_argument("--prompt-field", default="prompt", help="chat records without 'messages': the user's text")
    p.add_argument("--response-field", default="response", help="chat records without 'messages': the answer")
    p.add_argument("--chat-clean", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="in chat turns: CRLF -> LF, runs of blank lines -> one newline, strip")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (and count them) instead of stopping")
    p.add_argument("--workers", type=Optional[int], default=None,
                   help="tokenizing processes, this one included (default: one per core from 8 MiB of input "
                   "per core, else 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    options = RecordOptions(fmt=args.format, text_field=args.field, prompt_field=args.prompt_field,
                            response_field=args.response_field, template=ChatTemplate(clean=args.chat_clean))
    prepare(args.inputs, args.out, tokenizer=args.tokenizer, repeat=args.repeat, seed=args.seed,
            shuffle=args.shuffle, ctx_len=args.ctx_len, options=options, skip_bad=args.skip_bad,
            workers=args.workers, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
