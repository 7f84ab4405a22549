"""The local embedded default: a real etcd + kube-apiserver + kube-controller-manager on loopback."""
