"""Corpus, tokenizer, shards and packing, masking, `dwml prepare`."""
