// Command interop reads an rxledger transparency log served as C2SP tlog-tiles with an
// independent implementation, golang.org/x/mod/sumdb/tlog and sumdb/note, and checks it.
//
//	interop -url BASE/log -vkey VKEY [-old OLD_CHECKPOINT_FILE] [-samples N] [-seed S]
//
// It verifies the checkpoint's signature, authenticates every tile it reads against the
// checkpoint's root (tlog.TileHashReader), proves a sample of entries included from their
// entry bundles, and with -old proves the older checkpoint consistent with the current one.
// On success it prints a one-line JSON summary and exits 0; on any failure it prints the
// reason to stderr and exits 1.
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

const (
	tileHeight = 8
	tileWidth  = 1 << tileHeight
	maxBody    = 8 << 20
)

// checkpoint is a C2SP tlog-checkpoint whose signature has been verified.
type checkpoint struct {
	origin string
	tree   tlog.Tree
}

type summary struct {
	Origin         string `json:"origin"`
	Size           int64  `json:"size"`
	Root           string `json:"root"`
	Checked        int    `json:"checked"`
	ConsistentWith *int64 `json:"consistentWith"`
}

func main() {
	// Every failure, a usage error too, exits 1: callers tell success from failure only.
	flags := flag.NewFlagSet("interop", flag.ContinueOnError)
	base := flags.String("url", "", "the log's base URL, e.g. http://127.0.0.1:8000/log")
	vkey := flags.String("vkey", "", "the log's verifier key, <name>+<hex id>+<base64 key>")
	old := flags.String("old", "", "a file holding an older signed checkpoint of the same log")
	samples := flags.Int("samples", 64, "entries to prove; all of them when the tree is no larger")
	seed := flags.Uint64("seed", uint64(time.Now().UnixNano()), "seed of the random sample")
	if err := flags.Parse(os.Args[1:]); err != nil {
		os.Exit(1)
	}
	if *base == "" || *vkey == "" || flags.NArg() != 0 || *samples < 0 {
		fmt.Fprintln(os.Stderr, "usage: interop -url BASE/log -vkey VKEY [-old FILE] [-samples N] [-seed S]")
		os.Exit(1)
	}
	out, err := run(strings.TrimSuffix(*base, "/"), *vkey, *old, *samples, *seed)
	if err != nil {
		fmt.Fprintln(os.Stderr, "interop:", err)
		os.Exit(1)
	}
	line, err := json.Marshal(out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "interop:", err)
		os.Exit(1)
	}
	fmt.Println(string(line))
}

func run(base, vkey, oldPath string, samples int, seed uint64) (*summary, error) {
	verifier, err := note.NewVerifier(vkey)
	if err != nil {
		return nil, fmt.Errorf("verifier key: %v", err)
	}
	verifiers := note.VerifierList(verifier)
	client := &client{base: base, http: &http.Client{Timeout: 30 * time.Second}}

	msg, err := client.get("checkpoint")
	if err != nil {
		return nil, err
	}
	cp, err := openCheckpoint(msg, verifiers)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %v", err)
	}
	hr := tlog.TileHashReader(cp.tree, &tileReader{client: client, saved: map[tlog.Tile][]byte{}})

	indices := sample(cp.tree.N, samples, seed)
	bundles := map[int64][][]byte{}
	for _, i := range indices {
		if err := proveEntry(client, hr, cp.tree, i, bundles); err != nil {
			return nil, fmt.Errorf("entry %d of tree size %d (seed %d): %v", i, cp.tree.N, seed, err)
		}
	}

	out := &summary{
		Origin:  cp.origin,
		Size:    cp.tree.N,
		Root:    cp.tree.Hash.String(),
		Checked: len(indices),
	}
	if oldPath != "" {
		size, err := proveConsistent(oldPath, verifiers, cp, hr)
		if err != nil {
			return nil, err
		}
		out.ConsistentWith = &size
	}
	return out, nil
}

// openCheckpoint verifies a signed note by the log's key and parses its checkpoint body.
// Signatures by other keys (witness cosignatures) are left unverified, not errors.
func openCheckpoint(msg []byte, verifiers note.Verifiers) (*checkpoint, error) {
	n, err := note.Open(msg, verifiers)
	if err != nil {
		return nil, err
	}
	// tlog.ParseTree wants the go.sum header line; a C2SP checkpoint starts with its origin
	// and may carry extension lines after the root.
	lines := strings.Split(strings.TrimSuffix(n.Text, "\n"), "\n")
	if len(lines) < 3 || lines[0] == "" {
		return nil, fmt.Errorf("note text has %d lines, want origin, size and root", len(lines))
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil || size < 0 || strconv.FormatInt(size, 10) != lines[1] {
		return nil, fmt.Errorf("tree size %q is not a non-negative decimal integer", lines[1])
	}
	root, err := tlog.ParseHash(lines[2])
	if err != nil {
		return nil, fmt.Errorf("root hash %q: %v", lines[2], err)
	}
	return &checkpoint{origin: lines[0], tree: tlog.Tree{N: size, Hash: root}}, nil
}

// sample chooses the leaf indices to prove: every leaf when there are no more than n,
// otherwise the first and last leaf, the leaves on each side of the last tile boundary,
// and random others.
func sample(size int64, n int, seed uint64) []int64 {
	if size == 0 || n == 0 {
		return nil
	}
	if size <= int64(n) {
		all := make([]int64, size)
		for i := range all {
			all[i] = int64(i)
		}
		return all
	}
	chosen := map[int64]bool{0: true, size - 1: true}
	if edge := (size - 1) / tileWidth * tileWidth; edge > 0 {
		chosen[edge-1], chosen[edge] = true, true
	}
	rng := rand.New(rand.NewPCG(seed, 0))
	for len(chosen) < n {
		chosen[rng.Int64N(size)] = true
	}
	out := make([]int64, 0, len(chosen))
	for i := range chosen {
		out = append(out, i)
	}
	slices.Sort(out)
	return out
}

// proveEntry reads leaf i from its entry bundle and checks that its record hash is the
// authenticated stored hash and that an inclusion proof from the tiles verifies.
func proveEntry(c *client, hr tlog.HashReader, tree tlog.Tree, i int64, bundles map[int64][][]byte) error {
	n := i / tileWidth
	leaves, ok := bundles[n]
	if !ok {
		w := min(tree.N-n*tileWidth, tileWidth)
		data, err := c.get(entriesPath(n, int(w)))
		if err != nil {
			return err
		}
		if leaves, err = parseBundle(data); err != nil {
			return fmt.Errorf("entry bundle %s: %v", entriesPath(n, int(w)), err)
		}
		if int64(len(leaves)) != w {
			return fmt.Errorf("entry bundle %s has %d entries, want %d", entriesPath(n, int(w)), len(leaves), w)
		}
		bundles[n] = leaves
	}
	leaf := tlog.RecordHash(leaves[i%tileWidth])

	stored, err := hr.ReadHashes([]int64{tlog.StoredHashIndex(0, i)})
	if err != nil {
		return fmt.Errorf("reading its hash from the tiles: %v", err)
	}
	if stored[0] != leaf {
		return fmt.Errorf("leaf hash from the entry bundle %v, tiles say %v", leaf, stored[0])
	}
	proof, err := tlog.ProveRecord(tree.N, i, hr)
	if err != nil {
		return fmt.Errorf("building the inclusion proof from the tiles: %v", err)
	}
	if err := tlog.CheckRecord(proof, tree.N, tree.Hash, i, leaf); err != nil {
		return fmt.Errorf("inclusion proof: %v", err)
	}
	return nil
}

// proveConsistent checks that the older checkpoint in the file is signed by the log and that
// the current tree extends it. It returns the older tree's size.
func proveConsistent(path string, verifiers note.Verifiers, cp *checkpoint, hr tlog.HashReader) (int64, error) {
	msg, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("old checkpoint: %v", err)
	}
	old, err := openCheckpoint(msg, verifiers)
	if err != nil {
		return 0, fmt.Errorf("old checkpoint %s: %v", path, err)
	}
	if old.origin != cp.origin {
		return 0, fmt.Errorf("old checkpoint is of log %q, the current one of %q", old.origin, cp.origin)
	}
	if old.tree.N > cp.tree.N {
		return 0, fmt.Errorf("old checkpoint has size %d, larger than the current %d: the log shrank", old.tree.N, cp.tree.N)
	}
	if old.tree.N == 0 {
		// tlog proves trees of at least one leaf; every log extends the empty tree.
		if empty := tlog.Hash(sha256.Sum256(nil)); old.tree.Hash != empty {
			return 0, fmt.Errorf("old checkpoint of size 0 has root %v, want the empty tree's %v", old.tree.Hash, empty)
		}
		return 0, nil
	}
	proof, err := tlog.ProveTree(cp.tree.N, old.tree.N, hr)
	if err != nil {
		return 0, fmt.Errorf("building the consistency proof %d -> %d from the tiles: %v", old.tree.N, cp.tree.N, err)
	}
	if err := tlog.CheckTree(proof, cp.tree.N, cp.tree.Hash, old.tree.N, old.tree.Hash); err != nil {
		return 0, fmt.Errorf("checkpoint %d (root %v) is not consistent with old checkpoint %d (root %v): %v",
			cp.tree.N, cp.tree.Hash, old.tree.N, old.tree.Hash, err)
	}
	return old.tree.N, nil
}

// parseBundle splits a tlog-tiles entry bundle into its entries (big-endian uint16 length
// prefixes).
func parseBundle(data []byte) ([][]byte, error) {
	var leaves [][]byte
	for len(data) > 0 {
		if len(data) < 2 {
			return nil, fmt.Errorf("truncated after %d entries", len(leaves))
		}
		n := int(binary.BigEndian.Uint16(data))
		if len(data) < 2+n {
			return nil, fmt.Errorf("entry %d is truncated: %d bytes left, want %d", len(leaves), len(data)-2, n)
		}
		leaves = append(leaves, data[2:2+n])
		data = data[2+n:]
	}
	return leaves, nil
}

// entriesPath is the tlog-tiles path of entry bundle n of w entries.
func entriesPath(n int64, w int) string {
	p := tilePath(tlog.Tile{H: tileHeight, L: 0, N: n, W: w})
	return "tile/entries/" + strings.TrimPrefix(p, "tile/0/")
}

// tilePath is the C2SP tlog-tiles path of a tile: Go's go.sum layout names the height too
// ("tile/8/0/x001/234.p/5"), tlog-tiles does not ("tile/0/x001/234.p/5").
func tilePath(t tlog.Tile) string {
	return "tile/" + strings.TrimPrefix(t.Path(), fmt.Sprintf("tile/%d/", tileHeight))
}

type client struct {
	base string
	http *http.Client
}

// get fetches BASE/path; anything but 200 is an error. The transport asks for gzip and
// decodes it transparently.
func (c *client) get(path string) ([]byte, error) {
	url := c.base + "/" + path
	resp, err := c.http.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody+1))
	if err != nil {
		return nil, fmt.Errorf("GET %s: %v", url, err)
	}
	if len(body) > maxBody {
		return nil, fmt.Errorf("GET %s: body larger than %d bytes", url, maxBody)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %s", url, resp.Status, bytes.TrimSpace(body[:min(len(body), 200)]))
	}
	return body, nil
}

// tileReader serves tlog's tile requests over HTTP. Tiles are kept once tlog has
// authenticated them (SaveTiles); tlog authenticates every tile it reads regardless.
type tileReader struct {
	client *client
	saved  map[tlog.Tile][]byte
}

func (r *tileReader) Height() int { return tileHeight }

func (r *tileReader) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	data := make([][]byte, len(tiles))
	for i, t := range tiles {
		if d, ok := r.saved[t]; ok {
			data[i] = d
			continue
		}
		d, err := r.client.get(tilePath(t))
		if err != nil {
			return nil, err
		}
		if len(d) != t.W*tlog.HashSize {
			return nil, fmt.Errorf("%s is %d bytes, want %d", tilePath(t), len(d), t.W*tlog.HashSize)
		}
		data[i] = d
	}
	return data, nil
}

func (r *tileReader) SaveTiles(tiles []tlog.Tile, data [][]byte) {
	for i, t := range tiles {
		r.saved[t] = data[i]
	}
}
