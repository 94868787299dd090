//go:build linux

// Package conformance runs containerd's own snapshotter conformance suite
// (snapshots/testsuite) against a snapshotter served over gRPC, exactly the
// way containerd talks to a proxy_plugins snapshotter: through the
// snapshots/proxy client on a unix socket.
//
// Every suite test gets a fresh server process, started as
//
//	$CRFS_SERVE_CMD --root <root>/state --address <root>/crfs.sock
//
// (default CRFS_SERVE_CMD: "crfs serve"; split on blanks, no quoting). Point
// CRFS_SERVE_CMD at the refserver binary to run the same suite against
// containerd's built-in overlayfs snapshotter. See README.md.
//
// It is built in GOPATH mode against Debian's containerd 1.6 sources:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go test -c -o conformance.test .
package conformance

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"github.com/moby/sys/mountinfo"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

const (
	startTimeout = 20 * time.Second // until the socket serves gRPC
	stopTimeout  = 10 * time.Second // between SIGTERM and SIGKILL
	logTailLines = 200              // server output kept in a test's log
)

// live holds every server not yet stopped, so that the top-level test can
// kill whatever a crashed or aborted subtest left running.
var live sync.Map // *server -> struct{}

func TestConformance(t *testing.T) {
	t.Cleanup(func() {
		live.Range(func(k, _ interface{}) bool {
			k.(*server).stop()
			return true
		})
	})
	testsuite.SnapshotterSuite(t, "crfs", newSnapshotter)
}

// newSnapshotter is the suite's SnapshotterFunc. root is a fresh, empty
// directory per test (<tmp>/root); the suite mounts into <tmp>/work and
// removes <tmp> after calling our cleanup.
func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	sock := filepath.Join(root, "crfs.sock")
	if len(sock) >= 108 { // sizeof(sun_path): fail clearly, not with EINVAL
		return nil, nil, fmt.Errorf("socket path too long (%d bytes): %s; use a shorter TMPDIR", len(sock), sock)
	}
	tmp := filepath.Dir(root)
	s, err := startServer(filepath.Join(root, "state"), sock, filepath.Join(tmp, "server.log"))
	if err != nil {
		return nil, nil, err
	}
	conn, err := dial(sock, s.done)
	if err != nil {
		if s.exited() {
			err = fmt.Errorf("server exited: %v", s.err)
		}
		s.stop()
		return nil, nil, fmt.Errorf("server did not serve gRPC on %s: %w\nserver output:\n%s", sock, err, s.output())
	}

	cleanup := func() error {
		var errs []string
		// A failed test may return with snapshots still mounted; unmount
		// them while the server (which may back them) is still up.
		unmountUnder(ctx, filepath.Join(tmp, "work"))
		conn.Close()
		crashed := s.exited()
		if graceful := s.stop(); crashed {
			errs = append(errs, fmt.Sprintf("server exited before cleanup: %v", s.err))
		} else if !graceful {
			errs = append(errs, fmt.Sprintf("server ignored SIGTERM for %s and was killed", stopTimeout))
		}
		// Whatever the server mounted itself it must unmount on SIGTERM.
		if left := unmountUnder(ctx, tmp); len(left) > 0 {
			errs = append(errs, fmt.Sprintf("server left mounts behind: %v", left))
		}
		// Shown by `go test` only for failed tests (all tests with -v).
		for _, line := range tail(s.output(), logTailLines) {
			log.G(ctx).Info("server: " + line)
		}
		if len(errs) > 0 {
			return errors.New(strings.Join(errs, "; "))
		}
		return nil
	}
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "crfs"), cleanup, nil
}

// dial waits until the server accepts a gRPC connection on sock, giving up
// after startTimeout or as soon as the server process exits. The options
// mirror containerd's proxy plugin client (services/server/server.go), with
// a short backoff so that a server that is still starting is found quickly.
func dial(sock string, exited <-chan struct{}) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	go func() {
		select {
		case <-exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	bo := backoff.DefaultConfig
	bo.BaseDelay, bo.MaxDelay = 50*time.Millisecond, 500*time.Millisecond
	return grpc.DialContext(ctx, dialer.DialAddress(sock),
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: time.Second}),
		grpc.WithContextDialer(dialer.ContextDialer),
	)
}

// server is one snapshotter process, leader of its own process group.
type server struct {
	cmd  *exec.Cmd
	log  string        // file holding its stdout+stderr
	done chan struct{} // closed once the process has been reaped
	err  error         // Wait's result, valid after done

	stopOnce sync.Once
	graceful bool // exited within stopTimeout of SIGTERM
}

func startServer(state, sock, logPath string) (*server, error) {
	args := strings.Fields(os.Getenv("CRFS_SERVE_CMD"))
	if len(args) == 0 {
		args = []string{"crfs", "serve"}
	}
	args = append(args, "--root", state, "--address", sock)

	// Output goes to a file, not a pipe: with a pipe, Wait would also wait
	// for any helper the server spawned that still holds it open.
	out, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer out.Close()

	s := &server{cmd: exec.Command(args[0], args[1:]...), log: logPath, done: make(chan struct{})}
	s.cmd.Stdout, s.cmd.Stderr = out, out
	s.cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own group, so that stop can kill helpers the server leaves behind.
		Setpgid: true,
		// If this test binary dies (panic, -test.timeout, SIGKILL) the
		// kernel kills the server too. Pdeathsig fires when the forking
		// *thread* exits, which Go only does for goroutines that exit while
		// locked to a thread; nothing in this binary does that.
		Pdeathsig: syscall.SIGKILL,
	}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %q: %w (set CRFS_SERVE_CMD?)", args, err)
	}
	live.Store(s, struct{}{})
	go func() {
		s.err = s.cmd.Wait()
		close(s.done)
	}()
	return s, nil
}

func (s *server) exited() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the server, waits up to stopTimeout, then
// SIGKILLs its whole process group. It is idempotent and reports whether
// the server exited on SIGTERM.
func (s *server) stop() bool {
	s.stopOnce.Do(func() {
		defer live.Delete(s)
		if !s.exited() {
			s.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-s.done:
				s.graceful = true
			case <-time.After(stopTimeout):
			}
		}
		// The leader if it ignored SIGTERM, and any helper it left behind.
		syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.done
	})
	return s.graceful
}

// output returns what the server has written so far.
func (s *server) output() string {
	b, err := os.ReadFile(s.log)
	if err != nil {
		return fmt.Sprintf("[reading server log: %v]", err)
	}
	return string(b)
}

// unmountUnder lazily unmounts every mount at or below dir, deepest first,
// and returns their mount points. mount.UnmountAll uses fusermount3 for FUSE
// mounts (e.g. fuse3.fuse-overlayfs), which also ends their daemons.
func unmountUnder(ctx context.Context, dir string) []string {
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		log.G(ctx).WithError(err).Warn("reading mountinfo")
		return nil
	}
	var mps []string
	for _, m := range infos {
		mps = append(mps, m.Mountpoint)
	}
	sort.Sort(sort.Reverse(sort.StringSlice(mps))) // children before parents
	for _, mp := range mps {
		if err := mount.UnmountAll(mp, syscall.MNT_DETACH); err != nil {
			log.G(ctx).WithError(err).Warnf("unmounting %s", mp)
		}
	}
	return mps
}

func tail(s string, n int) []string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) == 1 && lines[0] == "" {
		return nil
	}
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("[... %d earlier lines]", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return lines
}
