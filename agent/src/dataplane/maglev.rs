//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4): the lookup table
//! the eBPF service load balancer picks a backend from. The agent computes
//! one table per Service backend set with [`table`] and writes it into a BPF
//! map; the kernel program sends a flow to `table[hash(flow) % M]`. Pure: no
//! I/O, no logging, no process randomness.
//!
//! # Why Maglev
//!
//! Each backend gets an almost equal share of the `M` slots (counts differ by
//! at most one), and when a backend joins or leaves, most slots that did not
//! belong to it keep their backend, so most established flows that miss
//! conntrack (after a node restart, on another node, after asymmetric
//! routing) still reach the backend they started on.
//!
//! # Stability across restarts and versions
//!
//! The table is part of the dataplane's observable behaviour, not an
//! implementation detail: an agent that restarts, or is upgraded, must
//! compute the same table as its predecessor for the same backends, and
//! every node must compute the same table as every other node, or flows
//! move to another backend mid-connection. So the result depends only on
//! the set of backend identities and `M`:
//! - the two hashes are written out here (FNV-1a 64 followed by the
//!   splitmix64 finalizer, with fixed seeds), never std's `DefaultHasher` or
//!   `RandomState`, which are seeded per process and may change between
//!   Rust releases;
//! - the population order is the identities' byte-wise order, not the
//!   caller's, so two agents that list the same endpoints in a different
//!   order fill the same slots with the same identities;
//! - the golden tests below pin exact outputs. Changing a hash, a seed, the
//!   order or the fill is a behaviour change that moves flows on upgrade:
//!   if it must happen, it is a new, versioned algorithm, not an edit.
//!
//! The identities themselves must be stable too: the caller formats them
//! the same way in every version (`198.18.128.5:8080`, `[fd00::5]:8080`).
//!
//! # Cost
//!
//! Permutations are generated lazily (one `(offset, skip)` pair per backend,
//! not an `N × M` matrix), so memory is `O(M + N)`. The fill probes about
//! `M · ln M` slots on average (the paper's `O(M log M)`: with `k` slots
//! free, a probe hits one with probability about `k/M`), and `O(M²)` in the
//! worst case, when `N` approaches `M` and the permutations collide. For
//! [`DEFAULT_TABLE_SIZE`] that is 5,000 to 7,000 probes whether there are 10
//! or 1,000 backends: cheap enough to run on every endpoint change.
//!
//! All backends weigh the same; weighted backends are not supported.

/// The table size `M` used when a Service does not configure one.
///
/// `M` must be prime: a backend's preference list visits slots
/// `offset, offset + skip, offset + 2·skip, … (mod M)`, which is a
/// permutation of all `M` slots exactly when `skip` and `M` are coprime, and
/// a prime `M` makes every `skip` in `1..M` coprime with it.
///
/// `M` must also be much larger than the backend count `N`. The fill gives
/// each backend `⌊M/N⌋` or `⌈M/N⌉` slots, so the worst relative imbalance is
/// about `N/M`, and disruption when backends change shrinks as `M/N` grows;
/// the paper recommends `M > 100·N` and Google runs with 65537. The price of
/// a larger `M` is a BPF map value of `4·M` bytes per Service (1021 → 4 KiB;
/// 65537 → 256 KiB, too much for clusters with thousands of Services) and
/// proportionally more work and map writes on every endpoint change. 1021
/// keeps the paper's ratio up to about 10 backends; it stays correct up to
/// 1021 of them, but shares of 2 and 3 slots (at 400 backends) are a 50%
/// imbalance, so Services with large backend sets should configure a
/// larger prime.
pub const DEFAULT_TABLE_SIZE: u32 = 1021;

/// Why a table cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("maglev table size m = {m} is too small: it must be a prime of at least 2 (default {DEFAULT_TABLE_SIZE})")]
    TableSizeTooSmall { m: u32 },
    #[error("maglev table size m = {m} is not prime: a backend's slot sequence would skip slots (default {DEFAULT_TABLE_SIZE})")]
    TableSizeNotPrime { m: u32 },
    #[error("maglev: {backends} backends do not fit a table of size m = {m}: m must be larger than the backend count (ideally 100 times)")]
    TooManyBackends { backends: usize, m: u32 },
    #[error(
        "maglev: backend {backend:?} is listed twice (backends[{first}] and backends[{second}])"
    )]
    DuplicateBackend {
        backend: String,
        first: usize,
        second: usize,
    },
}

/// Whether `n` is prime (deterministic trial division by `6k ± 1`, at most
/// about 22,000 divisions for the largest `u32`). Used to validate a
/// configured table size.
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d: u64 = 5;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// The Maglev lookup table of size `m` for `backends`: `m` entries, each an
/// index into `backends`. A flow hashing to `h` goes to
/// `backends[table[h % m]]`.
///
/// `backends` are stable, distinct backend identities (`198.18.128.5:8080`).
/// Their order does not matter: the same set yields the same identity in
/// every slot (the returned indices follow the caller's order).
///
/// Backend `i` (in byte-wise order of identities) prefers slots
/// `offset_i + j·skip_i (mod m)` for `j = 0, 1, …`, where
/// `offset_i = h1(name) % m` and `skip_i = h2(name) % (m − 1) + 1`. Backends
/// take turns, each claiming its next preferred slot that is still free,
/// until every slot is taken (the paper's `Populate`, with each backend's
/// `next` pointer walking its permutation lazily). Each backend ends with
/// `⌊m/N⌋` or `⌈m/N⌉` slots.
///
/// No backends is not an error: the table is empty and the dataplane must
/// treat the Service as having no endpoint (never compute `h % 0`). `m` is
/// validated even then, so a bad configuration shows before endpoints exist.
///
/// Errors: `m` below 2 or not prime, more backends than `m`, an identity
/// listed twice.
pub fn table(backends: &[&str], m: u32) -> Result<Vec<u32>, MaglevError> {
    if m < 2 {
        return Err(MaglevError::TableSizeTooSmall { m });
    }
    if !is_prime(m) {
        return Err(MaglevError::TableSizeNotPrime { m });
    }
    if backends.is_empty() {
        return Ok(Vec::new());
    }
    if backends.len() > m as usize {
        return Err(MaglevError::TooManyBackends {
            backends: backends.len(),
            m,
        });
    }

    // Caller indices in byte-wise order of identity: the fill's turn order.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_unstable_by(|&a, &b| backends[a].cmp(backends[b]).then(a.cmp(&b)));
    if let Some(pair) = order
        .windows(2)
        .find(|pair| backends[pair[0]] == backends[pair[1]])
    {
        return Err(MaglevError::DuplicateBackend {
            backend: backends[pair[0]].to_owned(),
            first: pair[0],
            second: pair[1],
        });
    }

    let size = u64::from(m);
    let mut walkers: Vec<Walker> = order
        .iter()
        .map(|&i| {
            let name = backends[i].as_bytes();
            Walker {
                // `i < backends.len() <= m <= u32::MAX`: the cast is lossless.
                index: i as u32,
                pos: h1(name) % size,
                skip: h2(name) % (size - 1) + 1,
            }
        })
        .collect();

    let mut slots: Vec<Option<u32>> = vec![None; m as usize];
    let mut filled: usize = 0;
    'fill: loop {
        for w in &mut walkers {
            // Terminates within m steps: a slot is free (filled < m) and the
            // walk visits every slot (m prime, 1 <= skip < m).
            while slots[w.pos as usize].is_some() {
                w.pos = (w.pos + w.skip) % size;
            }
            slots[w.pos as usize] = Some(w.index);
            w.pos = (w.pos + w.skip) % size;
            filled += 1;
            if filled == slots.len() {
                break 'fill;
            }
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

/// One backend's walk through its permutation of the slots.
struct Walker {
    /// The backend's index in the caller's slice.
    index: u32,
    /// The next slot it would claim (`offset + next·skip mod m`).
    pos: u64,
    skip: u64,
}

/// The 64-bit FNV-1a offset basis, the seed of [`h1`].
const H1_SEED: u64 = 0xcbf2_9ce4_8422_2325;
/// The seed of [`h2`]: 2⁶⁴ divided by the golden ratio, any fixed constant
/// far from [`H1_SEED`] would do.
const H2_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// The hash that places a backend's first preferred slot (`offset`).
fn h1(name: &[u8]) -> u64 {
    splitmix64(fnv1a(H1_SEED, name))
}

/// The hash that spaces a backend's preferred slots (`skip`): the same
/// construction from another seed, so that a backend's skip tells nothing
/// about its offset.
fn h2(name: &[u8]) -> u64 {
    splitmix64(fnv1a(H2_SEED, name))
}

/// FNV-1a, 64 bits, starting from `seed` (the standard hash when `seed` is
/// the offset basis). Its low output bits depend only on low state bits, so
/// it is never used without [`splitmix64`].
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The splitmix64 finalizer (Steele, Lea and Flood, 2014): a bijection in
/// which every output bit depends on every input bit, so `% m` sees a
/// well-mixed value.
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A deterministic generator for test inputs (splitmix64's stream).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            splitmix64(self.0)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                v.swap(i, self.below(i + 1));
            }
        }
    }

    /// `n` distinct endpoint identities, random in 10.0.0.0/8.
    fn endpoints(rng: &mut Rng, n: usize) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(n);
        while out.len() < n {
            let r = rng.next();
            let id = format!(
                "10.{}.{}.{}:{}",
                r & 0xff,
                (r >> 8) & 0xff,
                (r >> 16) & 0xff,
                8000 + (r >> 24) % 3
            );
            if !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }

    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    /// The table with each index replaced by its identity.
    fn named<'a>(backends: &[&'a str], m: u32) -> Vec<&'a str> {
        table(backends, m)
            .expect("valid input")
            .into_iter()
            .map(|i| backends[i as usize])
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in table {
            c[i as usize] += 1;
        }
        c
    }

    #[test]
    fn is_prime_matches_a_sieve() {
        const LIMIT: usize = 20_000;
        let mut sieve = vec![true; LIMIT];
        sieve[0] = false;
        sieve[1] = false;
        for i in 2..LIMIT {
            if sieve[i] {
                for j in (i * i..LIMIT).step_by(i) {
                    sieve[j] = false;
                }
            }
        }
        for (n, &prime) in sieve.iter().enumerate() {
            assert_eq!(is_prime(n as u32), prime, "is_prime({n})");
        }
    }

    #[test]
    fn is_prime_at_the_edges_of_u32() {
        assert!(is_prime(DEFAULT_TABLE_SIZE));
        assert!(is_prime(65_537));
        assert!(is_prime(4_294_967_291), "largest u32 prime");
        assert!(!is_prime(u32::MAX), "3 · 5 · 17 · 257 · 65537");
        assert!(
            !is_prime(4_293_001_441),
            "65521², needs the divisor at sqrt"
        );
        assert!(is_prime(4_294_967_279), "second largest u32 prime");
    }

    #[test]
    fn hashes_are_pinned() {
        // Published FNV-1a 64 vectors.
        assert_eq!(fnv1a(H1_SEED, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(H1_SEED, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(H1_SEED, b"foobar"), 0x8594_4171_f739_67e8);
        // splitmix64's first output from seed 0 (state 0x9e3779b97f4a7c15).
        assert_eq!(splitmix64(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
        // The hashes the table is built from: changing these moves flows.
        assert_eq!(h1(b"198.18.128.5:8080"), 0x7370_30eb_c9c2_33dd);
        assert_eq!(h2(b"198.18.128.5:8080"), 0x55df_7e87_afc6_b4a0);
    }

    // The golden tables were cross-checked against a separate
    // implementation of the paper's pseudocode (full permutation lists).

    #[test]
    fn golden_small_table() {
        let backends = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];
        assert_eq!(
            table(&backends, 13).expect("valid"),
            vec![1, 0, 2, 2, 1, 1, 0, 2, 0, 1, 0, 0, 2]
        );
    }

    #[test]
    fn golden_default_size_table() {
        let backends: Vec<String> = (1..=10).map(|i| format!("198.18.128.{i}:8080")).collect();
        let t = table(&refs(&backends), DEFAULT_TABLE_SIZE).expect("valid");
        assert_eq!(t.len(), DEFAULT_TABLE_SIZE as usize);
        let bytes: Vec<u8> = t.iter().flat_map(|i| i.to_le_bytes()).collect();
        assert_eq!(
            fnv1a(H1_SEED, &bytes),
            0x3880_7858_5e7e_1f4c,
            "digest of all 1021 entries"
        );
    }

    #[test]
    fn every_entry_is_valid_and_shares_differ_by_at_most_one() {
        let mut rng = Rng(1);
        for &m in &[2, 3, 13, 251, DEFAULT_TABLE_SIZE, 65_537] {
            for &n in &[1, 2, 3, 7, 10, 100, 1021] {
                if n > m as usize {
                    continue;
                }
                let names = endpoints(&mut rng, n);
                let t = table(&refs(&names), m).expect("valid");
                assert_eq!(t.len(), m as usize);
                assert!(t.iter().all(|&i| (i as usize) < n), "m={m} n={n}");
                // Each round gives every backend one slot; the last, partial
                // round gives one more to the first m % n in turn order.
                let c = counts(&t, n);
                let (q, r) = (m as usize / n, m as usize % n);
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| names[a].cmp(&names[b]));
                for (rank, &i) in order.iter().enumerate() {
                    let want = if rank < r { q + 1 } else { q };
                    assert_eq!(c[i], want, "m={m} n={n} backend {}", names[i]);
                }
            }
        }
    }

    #[test]
    fn result_is_independent_of_input_order() {
        let mut rng = Rng(2);
        for &n in &[2, 10, 100] {
            let names = endpoints(&mut rng, n);
            let mut shuffled = refs(&names);
            let want = named(&shuffled, DEFAULT_TABLE_SIZE);
            for _ in 0..5 {
                rng.shuffle(&mut shuffled);
                assert_eq!(named(&shuffled, DEFAULT_TABLE_SIZE), want, "n={n}");
            }
        }
    }

    /// Over `sets` random sets of `n` backends, removing each backend in
    /// turn: the worst single removal's and the overall fraction of slots
    /// that did not belong to the removed backend yet changed backend.
    fn removal_disruption(seed: u64, sets: usize, n: usize, m: u32) -> (f64, f64) {
        let mut rng = Rng(seed);
        let (mut moved_total, mut kept_total, mut worst) = (0, 0, 0.0f64);
        for _ in 0..sets {
            let names = endpoints(&mut rng, n);
            let all = refs(&names);
            let before = named(&all, m);
            for gone in &all {
                let rest: Vec<&str> = all.iter().copied().filter(|b| b != gone).collect();
                let after = named(&rest, m);
                let kept: Vec<usize> = (0..m as usize).filter(|&s| before[s] != *gone).collect();
                let moved = kept.iter().filter(|&&s| after[s] != before[s]).count();
                worst = worst.max(moved as f64 / kept.len() as f64);
                moved_total += moved;
                kept_total += kept.len();
            }
        }
        (worst, moved_total as f64 / kept_total as f64)
    }

    #[test]
    fn removing_one_of_ten_backends_moves_few_other_slots() {
        // The removed backend's slots must move; the others move only where
        // refilling those slots displaces them. At M/N = 100 that is 2.7% on
        // average (measured over 3,000 random removals), with a tail to
        // about 12%: Maglev trades perfect balance for a little disruption.
        let (worst, overall) = removal_disruption(3, 20, 10, DEFAULT_TABLE_SIZE);
        assert!(
            overall < 0.05,
            "{:.1}% of other slots moved",
            overall * 100.0
        );
        assert!(
            worst < 0.15,
            "one removal moved {:.1}% of other slots",
            worst * 100.0
        );
    }

    #[test]
    fn a_larger_table_disrupts_less() {
        // The trade-off DEFAULT_TABLE_SIZE documents: Google's M = 65537
        // moves about 0.25% of other slots for the same change.
        let (worst, overall) = removal_disruption(5, 3, 10, 65_537);
        assert!(
            overall < 0.01,
            "{:.2}% of other slots moved",
            overall * 100.0
        );
        assert!(
            worst < 0.02,
            "one removal moved {:.2}% of other slots",
            worst * 100.0
        );
    }

    #[test]
    fn adding_an_eleventh_backend_moves_about_its_share() {
        const N: usize = 10;
        let m = DEFAULT_TABLE_SIZE as usize;
        let mut rng = Rng(4);
        let (mut extra_total, mut worst) = (0, 0);
        for _ in 0..20 {
            let names = endpoints(&mut rng, N + 1);
            let all = refs(&names);
            let (old, new) = (&all[..N], all[N]);
            let before = named(old, m as u32);
            let after = named(&all, m as u32);
            let share = after.iter().filter(|&&b| b == new).count();
            assert!(share == m / (N + 1) || share == m / (N + 1) + 1, "{share}");
            // Every slot the new backend took changed hands; beyond those,
            // a few shuffle between old backends (the mirror of a removal).
            let changed = (0..m).filter(|&s| before[s] != after[s]).count();
            let extra = changed - share;
            worst = worst.max(extra);
            extra_total += extra;
        }
        let mean = extra_total as f64 / 20.0 / m as f64;
        assert!(
            mean < 0.05,
            "{:.1}% of slots moved between old backends",
            mean * 100.0
        );
        assert!(
            worst * 100 < 15 * m,
            "one addition moved {worst} other slots"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 128,
            // Shrunk cases become deterministic tests here, not files beside the source.
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn any_distinct_identities_give_a_balanced_order_free_table(
            names in proptest::collection::btree_set(".{0,24}", 1..40),
            m in proptest::sample::select(vec![41u32, 251, DEFAULT_TABLE_SIZE]),
            seed: u64,
        ) {
            let sorted: Vec<&str> = names.iter().map(String::as_str).collect();
            let t = table(&sorted, m).expect("valid");
            prop_assert_eq!(t.len(), m as usize);
            prop_assert!(t.iter().all(|&i| (i as usize) < sorted.len()));
            let c = counts(&t, sorted.len());
            let (min, max) = (c.iter().min(), c.iter().max());
            prop_assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1), "{:?}", c);
            let mut shuffled = sorted.clone();
            Rng(seed).shuffle(&mut shuffled);
            prop_assert_eq!(named(&shuffled, m), named(&sorted, m));
        }
    }

    #[test]
    fn no_backends_is_an_empty_table() {
        assert_eq!(table(&[], DEFAULT_TABLE_SIZE), Ok(vec![]));
        assert_eq!(
            table(&[], 1000),
            Err(MaglevError::TableSizeNotPrime { m: 1000 })
        );
    }

    #[test]
    fn a_single_backend_takes_every_slot() {
        assert_eq!(table(&["10.0.0.1:80"], 13), Ok(vec![0; 13]));
    }

    #[test]
    fn as_many_backends_as_slots_each_get_one() {
        let names: Vec<String> = (0..13).map(|i| format!("10.0.0.{i}:80")).collect();
        let t = table(&refs(&names), 13).expect("valid");
        assert_eq!(counts(&t, 13), vec![1; 13]);
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let cases: &[(&[&str], u32, MaglevError, &str)] = &[
            (
                &["a"],
                0,
                MaglevError::TableSizeTooSmall { m: 0 },
                "table size m = 0 is too small",
            ),
            (
                &["a"],
                1,
                MaglevError::TableSizeTooSmall { m: 1 },
                "table size m = 1 is too small",
            ),
            (
                &["a"],
                1024,
                MaglevError::TableSizeNotPrime { m: 1024 },
                "table size m = 1024 is not prime",
            ),
            (
                &["a", "b", "c", "d"],
                3,
                MaglevError::TooManyBackends { backends: 4, m: 3 },
                "4 backends do not fit a table of size m = 3",
            ),
            (
                &["10.0.0.2:80", "10.0.0.1:80", "10.0.0.3:80", "10.0.0.1:80"],
                13,
                MaglevError::DuplicateBackend {
                    backend: "10.0.0.1:80".into(),
                    first: 1,
                    second: 3,
                },
                r#"backend "10.0.0.1:80" is listed twice (backends[1] and backends[3])"#,
            ),
        ];
        for (backends, m, want, message) in cases {
            let err = table(backends, *m).expect_err("invalid input");
            assert_eq!(&err, want);
            let shown = err.to_string();
            assert!(shown.contains(message), "{shown:?} lacks {message:?}");
        }
    }
}
