"""Highly available replicas on etcd: the client, election and the replica loop."""
