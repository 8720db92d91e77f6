import json

import numpy as np
import pytest
import torch
from datasets.distributed import split_dataset_by_node

from cocodc.config import ConfigError, DataConfig
from cocodc.data import (
    BPETokenizer,
    ByteTokenizer,
    Prefetcher,
    ShardLoader,
    StreamLoader,
    cut_sequences,
    load_domains,
    load_rank_data,
    open_stream,
    region_shards,
)


def test_kjv_ships_66_books():
    books = load_domains(DataConfig(source="kjv"))
    assert len(books) == 66
    assert books[0][0] == "Genesis" and books[-1][0] == "Revelation"
    assert books[0][1].startswith("Genesis 1\n\n  1 In the beginning God created the heaven and the earth.")
    assert sum(len(text) for _, text in books) > 4_000_000


def test_local_text_files_are_domains(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta text\n")
    domains = load_domains(DataConfig(source=str(tmp_path)))
    assert [(name.removeprefix(str(tmp_path)), text) for name, text in domains] == [
        ("/a.txt", "alpha text\n"),
        ("/sub/b.txt", "beta text\n"),
    ]
    with pytest.raises(ConfigError, match="no such file, or no .txt files"):
        load_domains(DataConfig(source=str(tmp_path / "missing")))


def test_cut_sequences_overlap_by_one_token():
    assert cut_sequences(np.arange(10), 3).tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert cut_sequences(np.arange(3), 3).shape == (0, 4)


def domain_histograms(shards, sequence_domain, domains):
    return [np.bincount(sequence_domain[s], minlength=domains) / len(s) for s in shards]


@pytest.mark.parametrize("split", ["iid", "non_iid"])
def test_shards_are_disjoint_complete_and_deterministic(split):
    sequence_domain = np.repeat(np.arange(20), 50)
    shards = region_shards(sequence_domain, 3, split, 0.1, seed=7)
    joined = np.concatenate(shards)
    assert len(joined) == len(np.unique(joined)) == len(sequence_domain)
    again = region_shards(sequence_domain, 3, split, 0.1, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    other = region_shards(sequence_domain, 3, split, 0.1, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other, strict=True))


def test_non_iid_regions_hold_different_domains():
    sequence_domain = np.repeat(np.arange(20), 50)

    def spread(split, alpha):
        hists = domain_histograms(region_shards(sequence_domain, 3, split, alpha, seed=1), sequence_domain, 20)
        return max(0.5 * np.abs(a - b).sum() for a in hists for b in hists)  # total variation

    assert spread("iid", 0.1) < 0.2
    assert spread("non_iid", 0.1) > 0.7
    assert spread("non_iid", 100.0) < spread("non_iid", 1.0) < spread("non_iid", 0.1)


def test_loader_resumes_mid_epoch_and_across_epochs():
    sequences = np.arange(40, dtype=np.uint16).reshape(10, 4)
    indices = np.arange(10)
    reference = ShardLoader(sequences, indices, 4, seed=[0, 1])
    batches = [reference.next_batch() for _ in range(7)]  # 2 batches per epoch: crosses 3 epochs
    loader = ShardLoader(sequences, indices, 4, seed=[0, 1])
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    resumed = ShardLoader(sequences, indices, 4, seed=[0, 1])
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch()) for a in batches[3:])
    epoch0 = torch.cat(batches[:2]).flatten().tolist()
    assert len(set(epoch0)) == len(epoch0)  # no sequence twice within an epoch
    with pytest.raises(ConfigError, match=r"fewer than a step's batch of \d+ \(train.batch_size x train.grad_accum\)"):
        ShardLoader(sequences, indices[:3], 4, seed=[0])


def test_rank_data_is_disjoint_across_ranks():
    config = DataConfig(source="kjv", split="non_iid", dirichlet_alpha=0.3)
    shards = [
        load_rank_data(
            config,
            ByteTokenizer(),
            seed=0,
            batch_size=8,
            seq_len=64,
            eval_batch_count=2,
            regions=2,
            ranks_per_region=2,
            rank=rank,
        )
        for rank in range(4)
    ]
    index_sets = [set(s.loader.loader.indices.tolist()) for s in shards]  # under the prefetcher
    assert sum(map(len, index_sets)) == len(set().union(*index_sets))
    assert all(torch.equal(a, b) for a, b in zip(shards[0].eval_batches, shards[3].eval_batches, strict=True))
    assert shards[0].eval_batches[0].shape == (8, 65)


def test_bpe_trains_saves_and_loads(tmp_path):
    texts = [text for _, text in load_domains(DataConfig(source="kjv"))[:3]]
    tokenizer = BPETokenizer.train(texts, vocab_size=400)
    assert tokenizer.vocab_size == 400
    assert tokenizer.eos_id is not None
    tokenizer.save(tmp_path / "tok.json")
    loaded = BPETokenizer.load(tmp_path / "tok.json")
    sample = ["In the beginning God created the heaven and the earth."]
    ids = loaded.encode(sample)[0]
    assert np.array_equal(ids, tokenizer.encode(sample)[0])
    assert len(ids) < len(sample[0]) / 2  # merges learned from the corpus compress it


def test_stream_source_shards_and_resumes(tmp_path):
    # The `hf:` path is `datasets` streaming; here it streams a local folder, as it would a hub name.
    folder = tmp_path / "corpus"
    folder.mkdir()
    rows = [{"text": f"document number {i} " * (i % 7 + 1)} for i in range(40)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DataConfig(source=f"hf:{folder}")
    stream = open_stream(config)

    def loader():
        mine = split_dataset_by_node(open_stream(config).skip(10), rank=1, world_size=2)
        return StreamLoader(mine, ByteTokenizer(), "text", batch_size=2, seq_len=32)

    reference = loader()
    batches = [reference.next_batch() for _ in range(40)]  # more than one pass over the shard
    assert reference.epoch >= 1
    first = loader()
    for _ in range(5):
        first.next_batch()
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, resumed.next_batch()) for a in batches[5:])
    assert stream.column_names == ["text"]
    with pytest.raises(ConfigError, match="data.text_field 'body' is not a column"):
        open_stream(DataConfig(source=f"hf:{folder}", text_field="body"))


def test_a_shard_loader_skips_to_where_as_many_batches_would_leave_it():
    # A region healed from a peer jumps to the peer's step: skip(n) is n next_batch() calls.
    sequences = np.arange(50 * 3).reshape(50, 3)
    for before, skipped in ((0, 0), (0, 5), (3, 7), (5, 13), (2, 40)):
        read, jumped = (ShardLoader(sequences, np.arange(23), 4, [1]) for _ in range(2))
        for _ in range(before):
            read.next_batch(), jumped.next_batch()
        for _ in range(skipped):
            read.next_batch()
        jumped.skip(skipped)
        assert read.state_dict() == jumped.state_dict()
        assert torch.equal(read.next_batch(), jumped.next_batch())


def test_the_prefetcher_hands_out_the_loader_s_batches_and_state():
    sequences = np.arange(40 * 5).reshape(40, 5)

    def loader() -> ShardLoader:
        return ShardLoader(sequences, np.arange(40), 4, seed=[1])

    bare, ahead = loader(), Prefetcher(loader(), depth=3)
    for _ in range(14):  # over an epoch's end
        assert torch.equal(ahead.next_batch(), bare.next_batch())
    assert ahead.state_dict() == bare.state_dict()  # the handed-out batches', not the thread's
    saved = ahead.state_dict()
    after = [ahead.next_batch() for _ in range(3)]
    ahead.load_state_dict(saved)
    assert all(torch.equal(ahead.next_batch(), batch) for batch in after)
    ahead.skip(5)
    bare.load_state_dict(saved)
    bare.skip(3 + 5)
    assert torch.equal(ahead.next_batch(), bare.next_batch())


def test_the_prefetcher_raises_the_loader_s_error_in_the_step():
    class Failing(ShardLoader):
        def next_batch(self, size=None):
            raise ConfigError("data.source holds no documents for this rank")

    ahead = Prefetcher(Failing(np.zeros((8, 3)), np.arange(8), 4, seed=[0]), depth=2)
    with pytest.raises(ConfigError, match="holds no documents"):
        ahead.next_batch()
