// Command refserver serves containerd's built-in overlayfs snapshotter over
// the snapshots gRPC API on a unix socket, with the same flags as
// `crfs serve`. It is the reference the conformance suite is checked
// against: same suite, same proxy client, same transport, known-good
// snapshotter.
//
//	refserver --root DIR --address SOCKET
package main

import (
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots/overlay"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "", "snapshotter state directory")
	address := flag.String("address", "", "unix socket to listen on")
	flag.Parse()
	if *root == "" || *address == "" {
		log.Fatal("--root and --address are required")
	}

	sn, err := overlay.NewSnapshotter(*root)
	if err != nil {
		log.Fatalf("overlay snapshotter: %v", err)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))

	os.Remove(*address) // a stale socket from a previous run
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.Fatal(err)
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		srv.Stop() // also closes l
	}()

	log.Printf("serving overlayfs snapshotter on %s (root %s)", *address, *root)
	if err := srv.Serve(l); err != nil {
		log.Fatal(err)
	}
	if err := sn.Close(); err != nil {
		log.Fatal(err)
	}
}
