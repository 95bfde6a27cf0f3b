"""Lazy start: an image's squashfs kept in the registry as a blob of its own, read block by block.

artifact: the registry side (publish once, find it for an image digest). chunks: the verified block cache.
serve: the user's FUSE reader exposing the squashfs as one file. mount: what `nagaya run --pull lazy` calls.
"""
