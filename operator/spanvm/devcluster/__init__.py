"""The local embedded default: real etcd, kube-apiserver, kube-controller-manager on loopback."""
