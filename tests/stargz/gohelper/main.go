// Command gohelper drives the eStargz reference implementation
// (github.com/containerd/stargz-snapshotter/estargz) for crfs's
// interoperability tests and benchmark. Built in GOPATH mode against
// Debian's golang-github-containerd-stargz-snapshotter-dev.
//
//	gohelper build IN.tar OUT [--chunk-size N] [--level L] [--prioritize PATH]...
//	    estargz.Build; prints {"digest","diffID","tocDigest","size"} as JSON
//	gohelper verify BLOB TOCDIGEST
//	    estargz.Open + VerifyTOC, then every chunk of every file through its
//	    verifier; prints {"files","chunks"}; exit 1 on any failure
//	gohelper ls BLOB
//	    every path (implicit directories included, the root excluded), sorted,
//	    as JSON lines, with the sha256 of each regular file's contents
package main

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strconv"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: gohelper build|verify|ls ..."))
	}
	var err error
	switch os.Args[1] {
	case "build":
		err = build(os.Args[2:])
	case "verify":
		err = verify(os.Args[2:])
	case "ls":
		err = ls(os.Args[2:])
	default:
		err = fmt.Errorf("unknown subcommand %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "gohelper:", err)
	os.Exit(1)
}

func printJSON(v interface{}) {
	b, err := json.Marshal(v)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(b))
}

func build(args []string) error {
	var positional, prioritized []string
	opts := []estargz.Option{}
	for i := 0; i < len(args); i++ {
		switch args[i] {
		case "--chunk-size", "--level", "--prioritize":
			if i+1 >= len(args) {
				return fmt.Errorf("%s needs a value", args[i])
			}
			flag, value := args[i], args[i+1]
			i++
			if flag == "--prioritize" {
				prioritized = append(prioritized, value)
				continue
			}
			n, err := strconv.Atoi(value)
			if err != nil {
				return fmt.Errorf("%s: %v", flag, err)
			}
			if flag == "--chunk-size" {
				opts = append(opts, estargz.WithChunkSize(n))
			} else {
				opts = append(opts, estargz.WithCompressionLevel(n))
			}
		default:
			positional = append(positional, args[i])
		}
	}
	if len(positional) != 2 {
		return fmt.Errorf("usage: build IN.tar OUT [--chunk-size N] [--level L] [--prioritize PATH]...")
	}
	if len(prioritized) > 0 {
		opts = append(opts, estargz.WithPrioritizedFiles(prioritized))
	}
	in, err := os.Open(positional[0])
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	blob, err := estargz.Build(io.NewSectionReader(in, 0, st.Size()), opts...)
	if err != nil {
		return err
	}
	defer blob.Close()
	out, err := os.Create(positional[1])
	if err != nil {
		return err
	}
	defer out.Close()
	blobDigest := digest.Canonical.Digester()
	n, err := io.Copy(io.MultiWriter(out, blobDigest.Hash()), blob)
	if err != nil {
		return err
	}
	if err := blob.Close(); err != nil {
		return err
	}
	printJSON(map[string]interface{}{
		"digest":    blobDigest.Digest().String(),
		"diffID":    blob.DiffID().String(),
		"tocDigest": blob.TOCDigest().String(),
		"size":      n,
	})
	return out.Close()
}

func open(name string) (*estargz.Reader, *os.File, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	r, err := estargz.Open(io.NewSectionReader(f, 0, st.Size()))
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return r, f, nil
}

// walk calls fn for every path below the root, sorted, with the entry the
// reader resolves it to (a hardlink's name resolves to its target's entry).
func walk(r *estargz.Reader, fn func(p string, e *estargz.TOCEntry) error) error {
	root, ok := r.Lookup("")
	if !ok {
		return fmt.Errorf("no root directory")
	}
	var paths []string
	entries := map[string]*estargz.TOCEntry{}
	var visit func(dir string, d *estargz.TOCEntry)
	visit = func(dir string, d *estargz.TOCEntry) {
		d.ForeachChild(func(base string, e *estargz.TOCEntry) bool {
			p := path.Join(dir, base)
			paths = append(paths, p)
			entries[p] = e
			if e.Type == "dir" {
				visit(p, e)
			}
			return true
		})
	}
	visit("", root)
	sort.Strings(paths)
	for _, p := range paths {
		if err := fn(p, entries[p]); err != nil {
			return err
		}
	}
	return nil
}

func verify(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: verify BLOB TOCDIGEST")
	}
	r, f, err := open(args[0])
	if err != nil {
		return err
	}
	defer f.Close()
	tocDigest, err := digest.Parse(args[1])
	if err != nil {
		return err
	}
	verifier, err := r.VerifyTOC(tocDigest)
	if err != nil {
		return err
	}
	files, chunks := 0, 0
	seen := map[*estargz.TOCEntry]bool{}
	err = walk(r, func(p string, e *estargz.TOCEntry) error {
		if e.Type != "reg" || seen[e] {
			return nil
		}
		seen[e] = true
		files++
		sr, err := r.OpenFile(p)
		if err != nil {
			return err
		}
		for off := int64(0); off < e.Size; {
			ce, ok := r.ChunkEntryForOffset(p, off)
			if !ok {
				return fmt.Errorf("%s: no chunk at offset %d", p, off)
			}
			v, err := verifier.Verifier(ce)
			if err != nil {
				return fmt.Errorf("%s: %v", p, err)
			}
			if _, err := io.Copy(v, io.NewSectionReader(sr, ce.ChunkOffset, ce.ChunkSize)); err != nil {
				return fmt.Errorf("%s: reading chunk at %d: %v", p, ce.ChunkOffset, err)
			}
			if !v.Verified() {
				return fmt.Errorf("%s: chunk at %d does not match its digest", p, ce.ChunkOffset)
			}
			chunks++
			off = ce.ChunkOffset + ce.ChunkSize
		}
		if e.Digest != "" {
			d, err := digest.Parse(e.Digest)
			if err != nil {
				return err
			}
			fv := d.Verifier()
			if _, err := io.Copy(fv, sr); err != nil {
				return err
			}
			if !fv.Verified() {
				return fmt.Errorf("%s: contents do not match digest %s", p, e.Digest)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	printJSON(map[string]int{"files": files, "chunks": chunks})
	return nil
}

func ls(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: ls BLOB")
	}
	r, f, err := open(args[0])
	if err != nil {
		return err
	}
	defer f.Close()
	return walk(r, func(p string, e *estargz.TOCEntry) error {
		out := map[string]interface{}{
			"name":     p,
			"type":     e.Type,
			"mode":     e.Mode,
			"uid":      e.UID,
			"gid":      e.GID,
			"userName": e.Uname,
			"modtime":  e.ModTime3339,
			"size":     e.Size,
			"linkName": e.LinkName,
			"devMajor": e.DevMajor,
			"devMinor": e.DevMinor,
			"xattrs":   e.Xattrs,
			"nlink":    e.NumLink,
			"digest":   e.Digest,
		}
		if e.Name != p && e.Type != "dir" {
			// the reader resolved a hardlink at p to its target
			out["hardlinkTo"] = e.Name
		}
		if e.Type == "reg" {
			sr, err := r.OpenFile(p)
			if err != nil {
				return err
			}
			h := sha256.New()
			if _, err := io.Copy(h, sr); err != nil {
				return fmt.Errorf("%s: %v", p, err)
			}
			out["contentDigest"] = fmt.Sprintf("sha256:%x", h.Sum(nil))
		}
		printJSON(out)
		return nil
	})
}
