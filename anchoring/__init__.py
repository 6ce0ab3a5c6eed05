"""A generic verifiable log over MongoDB (RFC 9162 hashing, C2SP checkpoints and tiles).

Pure modules (`hashing`, `treemath`, `verify`, `note`, `encoding`) need neither a database nor
a network; the storage modules (`store`, `ledger`, `tiles`, `sequencer`, `anchorer`, `proofs`,
`audit`) talk to MongoDB through pymongo's AsyncMongoClient.
"""
