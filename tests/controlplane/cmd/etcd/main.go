// Command etcd is etcd's own server entry point (go.etcd.io/etcd/server/v3/etcdmain), built at
// the version k8s.io/kubernetes requires, so the test rig runs the etcd that Kubernetes is tested with.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
