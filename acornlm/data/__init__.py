"""acornlm.data: corpus reading, the default Shakespeare corpus, tokenized splits and the batch loader.

    from acornlm.data.shakespeare import fetch_shakespeare
    from acornlm.data.prepare import prepare_data
    from acornlm.data.loader import TokenLoader

    fetch_shakespeare("data/shakespeare")                       # train/ and val/ folders of .txt works
    prepare_data(["data/shakespeare"], "tok/", "data/shk-bpe")  # train-00000.bin, val-00000.bin, meta.json, ...
    loader = TokenLoader("data/shk-bpe", "train", batch_size=8, seq_len=256, seed=1337)
    x, y = loader.batch(step=0)

The submodules are imported explicitly (nothing here) so that tokenizer worker processes, which only
need `corpus` and `prepare`, never pay for importing torch.
"""
