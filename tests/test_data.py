"""The Grain pipeline: sources, packing without cross-document attention, determinism, sharding,
checkpointable iterators, tokenizers, and clear errors for bad data."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from jaxlm.data import pipeline, sources
from jaxlm.data.tokenizers import ByteTokenizer, load_tokenizer
from jaxlm.errors import ConfigError, DataError
from jaxlm.model import registry
from jaxlm.model.layers import attention_kernel, attention_mask, document_spans, rotary_angles


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def docs_of(tmp_path, texts):
    root = tmp_path / "docs"
    root.mkdir()
    for i, text in enumerate(texts):
        (root / f"{i:03d}.txt").write_text(text)
    return source_of(str(root))


def source_of(path):
    return sources.DocumentSource(sources.list_documents(path, "text"), "text")


def test_packed_rows_keep_documents_apart(tmp_path):
    texts = ["alpha beta", "gamma", "delta epsilon zeta eta", "theta iota kappa lambda mu nu xi"]
    refs = docs_of(tmp_path, texts)
    config = tiny_config(tmp_path, "data.seq_len=16")
    stream = iter(pipeline.packed_rows(refs, config, ByteTokenizer(), shuffle=False))
    rows = take(stream, 4)
    eos = ByteTokenizer.eos_id
    # Rows are the documents' (input, target) pairs, in order, cut every seq_len tokens.
    stream_inputs = np.concatenate([row["tokens"] for row in rows])
    stream_targets = np.concatenate([row["targets"] for row in rows])
    expected_inputs = np.concatenate([[eos, *text.encode()] for text in texts * 2])
    expected_targets = np.concatenate([[*text.encode(), eos] for text in texts * 2])
    n = min(len(stream_inputs), len(expected_inputs))
    np.testing.assert_array_equal(stream_inputs[:n], expected_inputs[:n])
    np.testing.assert_array_equal(stream_targets[:n], expected_targets[:n])
    for row in rows:
        # Within a row, segment ids number documents and positions restart with each one.
        assert row["segment_ids"][0] == 1 and np.all(np.diff(row["segment_ids"]) >= 0)
        new_document = np.flatnonzero(np.diff(row["segment_ids"])) + 1
        assert np.all(row["positions"][new_document] == 0)
        continues = np.diff(row["segment_ids"]) == 0
        assert np.all(np.diff(row["positions"])[continues] == 1)
        # Targets are the next inputs inside a document.
        same = row["segment_ids"][1:] == row["segment_ids"][:-1]
        assert np.array_equal(row["targets"][:-1][same], row["tokens"][1:][same])
        # Pretraining trains on every target of a document.
        np.testing.assert_array_equal(row["loss_mask"], np.ones_like(row["loss_mask"]))


def test_attention_never_crosses_documents():
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3]])
    mask = np.asarray(attention_mask(segment_ids))[0, 0]
    for q in range(8):
        for k in range(8):
            assert mask[q, k] == (k <= q and segment_ids[0, q] == segment_ids[0, k])


def test_document_spans_give_cudnn_each_documents_offset_and_length():
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3], [5, 5, 5, 5, 5, 5, 5, 5]])
    offsets, lengths = document_spans(segment_ids, max_documents=4)
    assert offsets.tolist() == [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]]
    assert lengths.tolist() == [[3, 2, 3, -1], [8, -1, -1, -1]]
    # Past max_documents, a row's last documents share the last kept one's span: spans still
    # cover the whole row, so every position attends (causally) to something.
    offsets, lengths = document_spans(segment_ids, max_documents=2)
    assert offsets.tolist() == [[0, 3, -1], [0, -1, -1]]
    assert lengths.tolist() == [[3, 5], [8, -1]]


def test_most_documents_per_row_counts_runs_of_segment_ids():
    segment_ids = np.array([[1, 1, 2, 2, 3, 4], [7, 7, 7, 7, 7, 7]])
    assert pipeline.most_documents_per_row(segment_ids) == 4
    assert pipeline.most_documents_per_row(segment_ids[1:]) == 1


def test_attention_auto_is_xla_off_hopper_gpus():
    cpu = jax.devices()[0]  # the tests run on CPU
    assert attention_kernel("auto", cpu) == "xla"
    assert attention_kernel("cudnn", cpu) == "cudnn"  # asked for: compiling will say it cannot run
    assert attention_kernel("xla", cpu) == "xla"


def test_rotary_angles_restart_with_each_document():
    positions = jnp.array([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    sin, cos = rotary_angles(positions, head_dim=8, theta=10000.0, table_length=8)
    assert sin.shape == cos.shape == (2, 8, 1, 4)
    inv_freq = 1.0 / 10000.0 ** (np.arange(4) / 4)
    angles = np.asarray(positions)[..., None, None] * inv_freq
    np.testing.assert_allclose(sin, np.sin(angles), atol=1e-6)
    np.testing.assert_allclose(cos, np.cos(angles), atol=1e-6)


def test_changing_one_document_leaves_the_others_logits_unchanged(tmp_path):
    config = tiny_config(tmp_path)
    model = registry.family_of(config.model).build(config.model, nnx.Rngs(0))
    segment_ids = jnp.array([[1] * 10 + [2] * 12 + [3] * 10])
    positions = jnp.array([list(range(10)) + list(range(12)) + list(range(10))])
    tokens = jax.random.randint(jax.random.key(1), (1, 32), 0, 256)
    changed = tokens.at[0, 10:22].set((tokens[0, 10:22] + 7) % 256)  # only document 2 changes
    before, after = (
        model(tokens, positions, segment_ids).logits,
        model(changed, positions, segment_ids).logits,
    )
    others = np.asarray(segment_ids[0] != 2)
    np.testing.assert_array_equal(np.asarray(before)[0, others], np.asarray(after)[0, others])
    assert not np.allclose(np.asarray(before)[0, ~others], np.asarray(after)[0, ~others])


def test_same_seed_same_batches_and_another_seed_another_order(tmp_path, corpus):
    refs = source_of(str(corpus))
    tokenizer = ByteTokenizer()
    first = pipeline.HostBatches(refs, tiny_config(tmp_path, "train.seed=3"), tokenizer)
    second = pipeline.HostBatches(refs, tiny_config(tmp_path, "train.seed=3"), tokenizer)
    other = pipeline.HostBatches(refs, tiny_config(tmp_path, "train.seed=4"), tokenizer)
    a, b, c = take(first, 6), take(second, 6), take(other, 6)
    for x, y in zip(a, b, strict=True):
        for field in pipeline.FIELDS:
            np.testing.assert_array_equal(x[field], y[field])
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c, strict=True))
    for iterator in (first, second, other):
        iterator.close()


def assert_resumes_exactly(data, config, before: int, after: int) -> dict:
    """Batches `before`+1 .. `before`+`after` of `data` equal those of a new iterator restored
    from the position after `before` batches; returns that position."""
    iterator = pipeline.HostBatches(data, config, ByteTokenizer())
    take(iterator, before)
    position = iterator.position()
    expected = take(iterator, after)
    iterator.close()
    resumed = pipeline.HostBatches(data, config, ByteTokenizer())
    resumed.restore_position([position])
    for x, y in zip(expected, take(resumed, after), strict=True):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    resumed.close()
    return position


def test_iterator_state_restores_the_exact_position(tmp_path, corpus):
    position = assert_resumes_exactly(source_of(str(corpus)), tiny_config(tmp_path), 5, 3)
    assert sorted(map(int, position["streams"])) == list(range(8))  # one stream per row


def test_streams_read_disjoint_documents(tmp_path):
    texts = [f"document number {i} " * (i + 1) for i in range(12)]
    refs = docs_of(tmp_path, texts)
    config = tiny_config(tmp_path, "data.seq_len=512")
    for stream_index in range(3):
        stream = iter(
            pipeline.packed_rows(refs, config, ByteTokenizer(), stream=stream_index, streams=3, shuffle=False)
        )
        text = bytes(b for b in next(stream)["tokens"] if b < 256).decode()
        # Documents stream, stream + 3, ...: its slice of every epoch's order.
        assert {i for i in range(12) if f"document number {i} " in text} == set(range(stream_index, 12, 3))


def test_a_batch_draws_each_row_from_another_document_even_when_a_few_documents_are_huge(tmp_path):
    # Three documents of 60,000 bytes among 40 of 100: packed one after the other, a huge one would
    # fill batch after batch of consecutive rows; here it fills one row of a batch at most.
    texts = [f"<{i:02d}>" * (15000 if i in (3, 17, 30) else 25) for i in range(43)]
    refs = docs_of(tmp_path, texts)
    batches = pipeline.HostBatches(refs, tiny_config(tmp_path, "data.prefetch=0"), ByteTokenizer())
    for batch in take(batches, 40):
        documents_of_rows = [
            {i for i in range(43) if f"<{i:02d}>" in bytes(b for b in row if b < 256).decode()}
            for row in batch["tokens"]
        ]
        # Each row of a batch comes from its own stream, and streams read disjoint documents (a
        # stream an epoch ahead of another may meet a document that one still reads: twice at most).
        for i in range(43):
            assert sum(i in row for row in documents_of_rows) <= 2, i
        assert len(set().union(*documents_of_rows)) >= 6
    batches.close()


def test_host_batches_have_the_global_batch_shape_and_become_sharded_arrays(tmp_path, corpus):
    from jaxlm import parallel

    config = tiny_config(tmp_path, "mesh.fsdp=4", "mesh.data=2")
    mesh = parallel.make_mesh(config)
    iterator = pipeline.HostBatches(source_of(str(corpus)), config, ByteTokenizer())
    batch = pipeline.to_global(next(iterator), parallel.batch_sharding(mesh, config.mesh.rules))
    iterator.close()
    assert batch["tokens"].shape == (8, 32)
    assert batch["tokens"].sharding.spec[0] == ("data", "fsdp")
    assert len(batch["tokens"].addressable_shards) == 8


def test_validation_split_is_stable_and_disjoint():
    refs = sources.stdlib_documents()
    train, validation = sources.split_documents(refs, 0.05)
    _, again_validation = sources.split_documents(list(reversed(refs)), 0.05)
    assert {r.name for r in validation} == {r.name for r in again_validation}
    assert not {r.name for r in train} & {r.name for r in validation}
    assert 0.02 < len(validation) / len(refs) < 0.09
    assert all(not r.name.startswith(("site-packages", "dist-packages")) for r in refs)


def test_jsonl_and_txt_documents_are_read(corpus):
    refs = sources.list_documents(str(corpus), "text")
    assert len(refs) == 8  # 5 .txt files + 3 .jsonl lines
    jsonl = [r for r in refs if r.offset >= 0]
    assert "kwlist" in sources.read_document(jsonl[1], "text")  # keyword.py, the second line
    assert len(sources.list_documents(str(corpus / "*.jsonl"), "text")) == 3


def test_tfds_dataset_is_a_source_for_training_and_eval(tmp_path, corpus):
    import tensorflow_datasets as tfds

    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]

    class JaxlmTestCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(texts[:4]),
                "validation": self._generate_examples(texts[4:]),
            }

        def _generate_examples(self, documents):
            for i, text in enumerate(documents):
                yield i, {"text": text}

    JaxlmTestCorpus(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    config = tiny_config(tmp_path, "data.tfds=jaxlm_test_corpus", f"data.tfds_data_dir={tmp_path / 'tfds'}")
    train, validation = sources.document_sources(config.data)
    assert len(train) == 4 and len(validation) == 1
    assert train[0] in texts[:4] and validation[0] == texts[4]
    batch = next(pipeline.HostBatches(train, config, ByteTokenizer()))
    assert batch["tokens"].shape == (8, 32)

    missing = tiny_config(
        tmp_path, "data.tfds=jaxlm_test_corpus", f"data.tfds_data_dir={tmp_path / 'elsewhere'}"
    )
    with pytest.raises(
        DataError, match=r"data.tfds=jaxlm_test_corpus split 'train' cannot be read from .*never downloads"
    ):
        sources.document_sources(missing.data)


def test_hugging_face_tokenizer_json_is_used(tmp_path, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"])
    tokenizer.train([str(p) for p in corpus.glob("*.txt")], trainer)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))

    config = tiny_config(tmp_path, f"data.tokenizer={path}")
    loaded = load_tokenizer(config.data)
    assert loaded.eos_id == tokenizer.token_to_id("<|endoftext|>")
    ids = loaded.encode("def main():\n    return 0\n")
    assert len(ids) < len("def main():\n    return 0\n")  # merges happened
    assert loaded.token_bytes()[loaded.eos_id] == 0
    rows = iter(pipeline.packed_rows(source_of(str(corpus)), config, loaded))
    assert next(rows)["tokens"].max() < loaded.vocab_size


def test_missing_path_and_empty_corpus_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"data.path=.*does not exist"):
        sources.list_documents(str(tmp_path / "missing"), "text")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"holds no \.txt, \.jsonl or \.parquet files"):
        sources.list_documents(str(empty), "text")
    (empty / "blank.txt").write_text("")
    with pytest.raises(DataError, match="corpus is empty"):
        sources.list_documents(str(empty), "text")


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + "{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        sources.list_documents(str(path), "text")
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"no string field 'text'; set data.text_field"):
        sources.list_documents(str(path), "text")
    path.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n\x80\x81 binary\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not UTF-8 text; fix or remove that line"):
        sources.list_documents(str(path), "text")


def test_rows_with_more_documents_than_cudnn_slots_warn(caplog):
    from jaxlm.training.train import _documents_fit

    batch = {"segment_ids": np.array([[1, 2, 3, 4], [5, 5, 5, 5]])}
    assert _documents_fit(batch, max_documents=4)
    assert "max_documents" not in caplog.text
    assert not _documents_fit(batch, max_documents=3)
    assert "a packed row holds 4 documents, more than attention.max_documents=3" in caplog.text


def test_a_position_saved_with_grain_workers_restores_into_the_same_layout(tmp_path, corpus):
    refs = source_of(str(corpus))
    position = assert_resumes_exactly(refs, tiny_config(tmp_path, "data.worker_count=1"), 3, 2)
    threads = pipeline.HostBatches(refs, tiny_config(tmp_path), ByteTokenizer())
    with pytest.raises(DataError, match=r"saved with data.worker_count=1 and this run sets 0"):
        threads.restore_position([position])
    threads.close()


def mixture_config(tmp_path, *overrides):
    """Two sources: documents of 'a's and documents of 'b's, mixed 70 / 30."""
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        for i in range(12):
            (root / f"{i}.txt").write_text(f"{name} " * (40 + 13 * i))
    mixture = f"[{{path: {tmp_path / 'a'}, weight: 7}}, {{path: {tmp_path / 'b'}, weight: 3}}]"
    return tiny_config(tmp_path, f"data.mixture={mixture}", *overrides)


def test_a_mixture_gives_each_source_its_weight_of_the_rows_of_every_batch(tmp_path):
    config = mixture_config(tmp_path, "data.prefetch=0")
    corpus = sources.corpus(config.data)
    assert [(part.name, part.weight) for part in corpus] == [
        (str(tmp_path / "a"), 0.7),
        (str(tmp_path / "b"), 0.3),
    ]
    batches = pipeline.HostBatches(corpus, config, ByteTokenizer())
    tokens = np.stack([batch["tokens"] for batch in take(batches, 400)])  # [400 batches, 8 rows, 32]
    batches.close()
    from_a, from_b = ((tokens == ord(letter)).any(axis=2) for letter in "ab")  # [batches, rows]
    assert np.all(from_a ^ from_b)  # a source's rows hold its own documents only
    assert from_a.mean() == pytest.approx(0.7, abs=0.01)
    # Each batch of 8 rows holds 8 × 0.7 = 5.6 rows of a: 5 or 6, never a batch of one source.
    assert set(from_a.sum(axis=1)) == {5, 6}


def test_a_mixture_resumes_at_the_exact_position(tmp_path):
    config = mixture_config(tmp_path)
    assert_resumes_exactly(sources.corpus(config.data), config, 7, 3)


def test_a_mixture_is_one_way_to_name_the_data(tmp_path):
    with pytest.raises(ConfigError, match=r"data.mixture and data.path=x are both set"):
        tiny_config(tmp_path, "data.mixture=[{path: y, weight: 1}]", "data.path=x")
    with pytest.raises(ConfigError, match=r"data.mixture\.0\.weight=0 is invalid"):
        tiny_config(tmp_path, "data.mixture=[{path: y, weight: 0}]")


def test_tokens_documents_and_epochs_are_counted_and_a_repeating_source_is_named(tmp_path, caplog):
    # 40 documents of 31 bytes: with the end-of-document token each fills one 32-token row.
    refs = docs_of(tmp_path, [f"document {i:02d} " + "x" * 19 for i in range(40)])
    batches = pipeline.HostBatches(refs, tiny_config(tmp_path), ByteTokenizer())
    take(batches, 4)  # 32 rows: 32 documents, epoch 0.8
    assert batches.counts.seen() == {"tokens_seen": 32 * 32, "documents_seen": 32, "epoch": 0.8}
    assert "repeating" not in caplog.text
    with caplog.at_level("WARNING", logger="jaxlm"):
        take(batches, 2)  # 48 documents
        assert batches.counts.seen()["epoch"] == 1.2
    assert "the data starts repeating: 48 documents seen of its 40 (epoch 2 begins)" in caplog.text
    with caplog.at_level("WARNING", logger="jaxlm"):
        take(batches, 6)  # 96 documents: epoch 3 begins, without a second warning
        assert batches.counts.seen()["epoch"] == 2.4
    assert caplog.text.count("starts repeating") == 1
    saved = batches.position()
    resumed = pipeline.HostBatches(refs, tiny_config(tmp_path), ByteTokenizer())
    resumed.restore_position([saved])
    assert resumed.counts.seen()["documents_seen"] == 96
    batches.close()
    resumed.close()


def parquet_corpus(tmp_path, texts, column="text", row_group_size=3):
    """A Parquet file as Hugging Face `datasets` writes one: a text column beside others."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "corpus" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    table = pa.table({"id": list(range(len(texts))), column: texts})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_rows_are_documents_read_in_any_order(tmp_path):
    texts = [f"row {i} " * (i + 1) for i in range(10)]
    texts[4] = ""  # an empty row is no document
    path = parquet_corpus(tmp_path, texts)
    refs = sources.list_documents(str(path.parent), "text")
    assert [ref.name for ref in refs] == [f"{path.name}:{i + 1}" for i in range(10) if i != 4]
    source = sources.DocumentSource(refs, "text")
    for index in (8, 0, 5, 3, 8, 1):  # across row groups of 3, back and forth
        assert source[index] == texts[int(refs[index].name.rsplit(":", 1)[1]) - 1]
    rows = iter(pipeline.packed_rows(source, tiny_config(tmp_path), ByteTokenizer(), shuffle=False))
    assert bytes(b for b in next(rows)["tokens"] if b < 256).decode().startswith("row 0 row 1 row 1")


def test_a_parquet_file_without_the_text_column_is_one_line_naming_the_columns(tmp_path):
    path = parquet_corpus(tmp_path, ["a", "b"], column="content")
    with pytest.raises(DataError, match=r"has no column 'text' \(it has id, content\); set data.text_field"):
        sources.list_documents(str(path), "text")
    assert len(sources.list_documents(str(path), "content")) == 2
