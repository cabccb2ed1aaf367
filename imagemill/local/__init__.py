"""Local mode: the whole data path on this machine, no Redis, no database; `imagemill annotate`.

`run` lists, skips, annotates and writes the output file; `pool` runs one engine process per GPU for `--gpus`.
"""
