"""Where a coordinator keeps its state: SQLite or etcd."""
