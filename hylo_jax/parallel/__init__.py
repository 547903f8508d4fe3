"""Parallelism beyond GSPMD: context parallelism, multi-host start-up, communication volume."""
