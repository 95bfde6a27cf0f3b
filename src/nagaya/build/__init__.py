"""Rootless image builds: Dockerfiles and Apptainer definition files -> one recipe -> buildah -> the cache."""
