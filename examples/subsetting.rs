//! The subsetting simulation: 10,000 servers, 1,000 clients, no network.
//!
//! For `Subset` (deterministic aperture) and, for comparison, gRPC's random subsetting (gRFC
//! A68: each client takes the instances that hash highest with its id), at a few subset
//! sizes, it reports:
//!
//! - connections per server, max / mean (each client connects to its whole subset);
//! - requests per server, max / mean, when every client sends the same traffic, spread over
//!   its subset by the weights the subset gives (what the balancer's picks converge to at
//!   equal latencies);
//! - the share of connections that move (are dropped, and as many made) when 1% of the
//!   servers leave.
//!
//! `cargo run --release --example subsetting` (about two minutes on 2 cores).

use std::collections::HashSet;

use tower_sd::ServiceInstance;
use tower_sd::registry::Subset;
use xxhash_rust::xxh64::xxh64;

const SERVERS: usize = 10_000;
const CLIENTS: usize = 1_000;

fn servers() -> Vec<ServiceInstance> {
    (0..SERVERS)
        .map(|i| {
            let address = format!("10.{}.{}.{}", i / 65_536, (i / 256) % 256, i % 256);
            ServiceInstance::new(format!("api-{i}"), "api", address, 8080)
        })
        .collect()
}

/// One client's subset: (server index, share of the client's traffic).
type Picks = Vec<(usize, f64)>;

fn index(instance: &ServiceInstance) -> usize {
    instance.id["api-".len()..].parse().expect("an api-N id")
}

fn aperture(servers: &[ServiceInstance], client: usize, size: usize) -> Picks {
    let subset = Subset::new(client, CLIENTS, size).expect("valid settings");
    let mine = subset.select(servers.to_vec());
    let total: f64 = mine.iter().map(|i| f64::from(i.weight)).sum();
    mine.iter()
        .map(|i| (index(i), f64::from(i.weight) / total))
        .collect()
}

/// gRFC A68's random subsetting: the `size` servers that hash highest with the client.
fn random(servers: &[ServiceInstance], client: usize, size: usize) -> Picks {
    let mut scored: Vec<(u64, usize)> = servers
        .iter()
        .map(|s| {
            let key = format!("client-{client}/{}", s.id);
            (xxh64(key.as_bytes(), 0), index(s))
        })
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored
        .into_iter()
        .take(size)
        .map(|(_, server)| (server, 1.0 / size as f64))
        .collect()
}

struct Report {
    connections: f64,
    requests: f64,
    moved: f64,
}

fn simulate(pick: fn(&[ServiceInstance], usize, usize) -> Picks, size: usize) -> Report {
    let all = servers();
    // 1% of the servers leave: those whose id hashes lowest.
    let mut by_hash: Vec<(u64, usize)> = all
        .iter()
        .map(|s| (xxh64(s.id.as_bytes(), 7), index(s)))
        .collect();
    by_hash.sort_unstable();
    let gone: HashSet<usize> = by_hash[..SERVERS / 100].iter().map(|&(_, i)| i).collect();
    let rest: Vec<ServiceInstance> = all
        .iter()
        .filter(|s| !gone.contains(&index(s)))
        .cloned()
        .collect();

    let mut connections = vec![0usize; SERVERS];
    let mut requests = vec![0f64; SERVERS];
    let (mut before_total, mut moved) = (0usize, 0usize);
    for client in 0..CLIENTS {
        let before = pick(&all, client, size);
        for &(server, share) in &before {
            connections[server] += 1;
            requests[server] += share;
        }
        let after: HashSet<usize> = pick(&rest, client, size)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        before_total += before.len();
        moved += before.iter().filter(|(s, _)| !after.contains(s)).count();
    }
    let ratio = |values: &[f64]| {
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        values.iter().copied().fold(0.0, f64::max) / mean
    };
    let connections: Vec<f64> = connections.iter().map(|&c| c as f64).collect();
    Report {
        connections: ratio(&connections),
        requests: ratio(&requests),
        moved: moved as f64 / before_total as f64,
    }
}

fn main() {
    println!("{SERVERS} servers, {CLIENTS} clients; 1% of servers leave for the last column");
    println!(
        "| algorithm | subset | connections max/mean | requests max/mean | connections moved |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for size in [50, 100, 200] {
        for (name, pick) in [
            (
                "deterministic aperture (tower-sd)",
                aperture as fn(&[ServiceInstance], usize, usize) -> Picks,
            ),
            ("random subsetting (gRFC A68)", random),
        ] {
            let report = simulate(pick, size);
            println!(
                "| {name} | {size} | {:.3} | {:.3} | {:.2}% |",
                report.connections,
                report.requests,
                report.moved * 100.0
            );
        }
    }
}
