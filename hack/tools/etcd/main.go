// Command etcd runs the upstream etcd server (etcdmain.Main), pinned by this module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
