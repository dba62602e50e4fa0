"""The stages of one migration, in the order the data goes through them.

settings  flags, then environment, then .env; the parser and --help
listing   pages of a bucket, read ahead; the S3 Inventory manifest
planning  pure code: pair each source with its destination, decide what to do
copying   the S3 client, and the CRT and boto3 copy engines behind one interface
database  row lookups and compare-and-set rewrites, the index and snapshot plans
journal   what each run rewrote, and the SQL that undoes it
run       the Migration: list, plan, copy on a bounded window, rewrite rows
report    typed outcomes, counters, the summary as data, JSON and text
verify    read-only reconciliation of both buckets and the table
rollback  point one run's rows back at their old keys

move.py at the repository root is the command; it only wires these together.
"""
