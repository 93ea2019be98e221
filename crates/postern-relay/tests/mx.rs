#![allow(clippy::unwrap_used)]
//! Next-hop lookup against a real authoritative DNS server on loopback, every lookup awaited
//! inside a glommio executor, so each answer crosses from the resolver's tokio thread to the
//! executor thread through a foreign wake.

mod support {
    pub mod dns_server;
}

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use postern_relay::mx::{MxError, Myself, NextHop, Resolver};
use support::dns_server::{Rec, TestDns};

const ZONE: &str = "example.test";

/// How long any one lookup may take before the test fails instead of hanging (a lost
/// cross-thread wake would otherwise hang forever).
const DEADLINE: Duration = Duration::from_secs(20);

fn v4(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

fn v6(text: &str) -> Ipv6Addr {
    text.parse().unwrap()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Runs `body` to completion on a glommio executor made on this thread.
fn on_glommio<F, T>(body: impl FnOnce() -> F) -> T
where
    F: Future<Output = T>,
{
    glommio::LocalExecutorBuilder::default()
        .io_memory(64 * 1024)
        .make()
        .unwrap()
        .run(body())
}

/// Awaits `next_hops` on the current glommio executor, failing after [`DEADLINE`]: the glommio
/// timer wakes the executor itself, so a lost wake from the resolver thread shows up here.
async fn next_hops(resolver: &Resolver, domain: &str) -> Result<Vec<NextHop>, MxError> {
    within_deadline(domain, resolver.next_hops(domain)).await
}

/// Awaits `lookup` of `name`, failing after [`DEADLINE`] (see [`next_hops`]).
async fn within_deadline<T>(name: &str, lookup: impl Future<Output = T>) -> T {
    let deadline = async {
        glommio::timer::sleep(DEADLINE).await;
        panic!("lookup of {name} never woke the executor");
    };
    futures_lite::future::or(lookup, deadline).await
}

/// Looks `domain` up once on a fresh glommio executor.
fn lookup(resolver: &Resolver, domain: &str) -> Result<Vec<NextHop>, MxError> {
    on_glommio(|| next_hops(resolver, domain))
}

fn hosts(hops: &[NextHop]) -> Vec<(u16, &str)> {
    hops.iter()
        .map(|h| (h.preference, h.host.as_str()))
        .collect()
}

/// [`Resolver::mx_next_hops`] for this server named `own`, once, on a fresh executor.
fn lookup_as(resolver: &Resolver, domain: &str, own: &str) -> Result<Vec<NextHop>, MxError> {
    on_glommio(|| within_deadline(domain, resolver.mx_next_hops(domain, own)))
        .map(|found| found.hops)
}

#[test]
fn this_server_is_found_among_the_mx_hosts_by_its_name_even_without_an_address() {
    let dns = TestDns::start(
        ZONE,
        &[
            // Our name, without any address, is the best MX of `@` and a backup of `backup`.
            ("@", Rec::Mx(10, "us")),
            ("@", Rec::Mx(20, "worse")),
            ("backup", Rec::Mx(5, "primary")),
            ("backup", Rec::Mx(10, "us")),
            ("backup", Rec::Mx(20, "worse")),
            ("primary", Rec::A(v4("192.0.2.5"))),
            ("worse", Rec::A(v4("192.0.2.20"))),
            ("us", Rec::Txt("no address here")),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let us = "US.example.test.";
    assert_eq!(
        lookup_as(&resolver, ZONE, us).unwrap_err(),
        MxError::LoopsToSelf("us.example.test".into())
    );
    let backup = format!("backup.{ZONE}");
    assert_eq!(
        hosts(&lookup_as(&resolver, &backup, us).unwrap()),
        [(5, "primary.example.test")]
    );
    // The domain named like this server, with no MX: its implicit MX is this server.
    assert_eq!(
        lookup_as(&resolver, &format!("us.{ZONE}"), us).unwrap_err(),
        MxError::LoopsToSelf("us.example.test".into())
    );
    // Another server's view of the same records: the host without an address is skipped.
    assert_eq!(
        hosts(&lookup_as(&resolver, ZONE, "mx.elsewhere.test").unwrap()),
        [(20, "worse.example.test")]
    );
    assert_eq!(
        lookup_as(&resolver, &format!("us.{ZONE}"), "mx.elsewhere.test").unwrap_err(),
        MxError::NoMailHost
    );
}

#[test]
fn resolver_handle_is_clone_send_sync() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    check::<Resolver>();
}

#[test]
fn records_of_other_names_in_an_answer_are_not_taken_for_the_name_asked_about() {
    // A forwarder (or a spoofer) that puts other names' records in the answer section: an MX
    // of another domain, preferred, and an address of another host, beside the real ones.
    // Taken for the domain's and its host's, they sent its mail to a host it never named.
    let dns = TestDns::start(
        ZONE,
        &[
            ("@", Rec::Mx(10, "mx")),
            ("mx", Rec::A(v4("192.0.2.10"))),
            ("evil", Rec::A(v4("192.0.2.66"))),
            ("other.stray", Rec::Mx(1, "evil")),
            ("host.stray", Rec::A(v4("192.0.2.99"))),
            ("alias", Rec::Cname("mx")),
            ("via", Rec::Mx(10, "alias")),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let hops = lookup(&resolver, ZONE).unwrap();
    assert_eq!(hosts(&hops), [(10, "mx.example.test")]);
    assert_eq!(hops[0].addrs, [ip("192.0.2.10")]);
    // An MX host that is an alias: its CNAME's target's addresses are its own.
    let hops = lookup(&resolver, "via.example.test").unwrap();
    assert_eq!(hosts(&hops), [(10, "alias.example.test")]);
    assert_eq!(hops[0].addrs, [ip("192.0.2.10")]);
}

#[test]
fn mx_hosts_come_in_preference_order_with_their_addresses() {
    let dns = TestDns::start(
        ZONE,
        &[
            ("@", Rec::Mx(30, "c")),
            ("@", Rec::Mx(10, "a")),
            ("@", Rec::Mx(20, "b.example.test.")),
            ("a", Rec::Aaaa(v6("2001:db8::a"))),
            ("a", Rec::A(v4("192.0.2.10"))),
            ("b", Rec::A(v4("192.0.2.20"))),
            ("b", Rec::A(v4("192.0.2.21"))),
            ("c", Rec::Aaaa(v6("2001:db8::c"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let hops = lookup(&resolver, ZONE).unwrap();
    assert_eq!(
        hosts(&hops),
        [
            (10, "a.example.test"),
            (20, "b.example.test"),
            (30, "c.example.test")
        ]
    );
    // IPv4 first, then IPv6.
    assert_eq!(hops[0].addrs, [ip("192.0.2.10"), ip("2001:db8::a")]);
    let mut b = hops[1].addrs.clone();
    b.sort();
    assert_eq!(b, [ip("192.0.2.20"), ip("192.0.2.21")]);
    assert_eq!(hops[2].addrs, [ip("2001:db8::c")]);
}

#[test]
fn equal_preferences_are_shuffled() {
    let dns = TestDns::start(
        ZONE,
        &[
            ("@", Rec::Mx(10, "a")),
            ("@", Rec::Mx(10, "b")),
            ("@", Rec::Mx(20, "c")),
            ("a", Rec::A(v4("192.0.2.1"))),
            ("b", Rec::A(v4("192.0.2.2"))),
            ("c", Rec::A(v4("192.0.2.3"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let (a_first, b_first) = on_glommio(|| async {
        let (mut a_first, mut b_first) = (0, 0);
        // Each order has probability 1/2; 200 draws all alike has probability 2^-199.
        for _ in 0..200 {
            let hops = next_hops(&resolver, ZONE).await.unwrap();
            let order = hosts(&hops);
            assert_eq!(order.len(), 3);
            assert_eq!(order[2], (20, "c.example.test"), "preference 20 comes last");
            match order[0].1 {
                "a.example.test" => a_first += 1,
                "b.example.test" => b_first += 1,
                other => panic!("unexpected first host {other}"),
            }
            if a_first > 0 && b_first > 0 {
                break;
            }
        }
        (a_first, b_first)
    });
    assert!(
        a_first > 0 && b_first > 0,
        "a first {a_first}, b first {b_first}"
    );
}

#[test]
fn host_named_twice_keeps_its_best_preference() {
    let dns = TestDns::start(
        ZONE,
        &[
            ("@", Rec::Mx(20, "mx")),
            ("@", Rec::Mx(5, "MX")),
            ("mx", Rec::A(v4("192.0.2.1"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    assert_eq!(
        hosts(&lookup(&resolver, ZONE).unwrap()),
        [(5, "mx.example.test")]
    );
}

#[test]
fn no_mx_falls_back_to_the_implicit_mx() {
    let dns = TestDns::start(
        ZONE,
        &[
            ("plain", Rec::A(v4("192.0.2.7"))),
            ("plain", Rec::Aaaa(v6("2001:db8::7"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let hops = lookup(&resolver, "plain.example.test").unwrap();
    assert_eq!(
        hops,
        [NextHop {
            host: "plain.example.test".into(),
            preference: 0,
            addrs: vec![ip("192.0.2.7"), ip("2001:db8::7")],
        }]
    );
}

#[test]
fn no_mx_and_no_address_is_no_mail_host() {
    // "empty" exists (an empty non-terminal above "x.empty") but has no records.
    let dns = TestDns::start(ZONE, &[("x.empty", Rec::A(v4("192.0.2.1")))]);
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let err = lookup(&resolver, "empty.example.test").unwrap_err();
    assert_eq!(err, MxError::NoMailHost);
    assert!(err.is_permanent());
    assert_eq!(err.enhanced(), "5.1.2");
}

#[test]
fn null_mx_refuses_mail() {
    let dns = TestDns::start(
        ZONE,
        &[
            ("@", Rec::Mx(0, ".")),
            // An address at the domain must not turn it into an implicit MX.
            ("@", Rec::A(v4("192.0.2.1"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let err = lookup(&resolver, ZONE).unwrap_err();
    assert_eq!(err, MxError::NullMx);
    assert!(err.is_permanent());
    assert_eq!(err.enhanced(), "5.1.10");
}

#[test]
fn null_mx_beside_real_hosts_is_skipped() {
    let dns = TestDns::start(
        ZONE,
        &[
            ("@", Rec::Mx(0, ".")),
            ("@", Rec::Mx(10, "mx")),
            ("mx", Rec::A(v4("192.0.2.1"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    assert_eq!(
        hosts(&lookup(&resolver, ZONE).unwrap()),
        [(10, "mx.example.test")]
    );
}

#[test]
fn nxdomain_is_no_such_domain() {
    let dns = TestDns::start(ZONE, &[("mx", Rec::A(v4("192.0.2.1")))]);
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let err = lookup(&resolver, "nowhere.example.test").unwrap_err();
    assert_eq!(err, MxError::NoSuchDomain);
    assert!(err.is_permanent());
    assert_eq!(err.enhanced(), "5.1.2");
}

#[test]
fn invalid_domain_is_no_such_domain_without_a_query() {
    let dns = TestDns::start(ZONE, &[]);
    let resolver = Resolver::with_server(dns.addr).unwrap();
    for bad in ["", ".", "[192.0.2.1", "[::1]", "[tag:whatever]"] {
        assert_eq!(
            lookup(&resolver, bad),
            Err(MxError::NoSuchDomain),
            "{bad:?}"
        );
    }
    assert_eq!(dns.query_count(), 0);
}

#[test]
fn mx_hosts_that_do_not_exist_are_unable_to_route() {
    let dns = TestDns::start(
        ZONE,
        &[("@", Rec::Mx(10, "gone")), ("@", Rec::Mx(20, "gone2"))],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let err = lookup(&resolver, ZONE).unwrap_err();
    assert_eq!(err, MxError::NoMxAddress);
    assert!(err.is_permanent());
    assert_eq!(err.enhanced(), "5.4.4");
}

#[test]
fn mx_hosts_with_malformed_names_are_skipped_without_a_lookup() {
    // A space, and a NUL, in a label: the zone gives them addresses, so only the check keeps
    // them out.
    let dns = TestDns::start(
        ZONE,
        &[
            ("@", Rec::Mx(10, "bad name")),
            ("@", Rec::Mx(20, "nul\0")),
            ("@", Rec::Mx(30, "ok")),
            ("bad name", Rec::A(v4("192.0.2.10"))),
            ("nul\0", Rec::A(v4("192.0.2.20"))),
            ("ok", Rec::A(v4("192.0.2.30"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    assert_eq!(
        hosts(&lookup(&resolver, ZONE).unwrap()),
        [(30, "ok.example.test")]
    );
}

#[test]
fn mx_records_that_name_only_malformed_hosts_are_unable_to_route() {
    let dns = TestDns::start_uncached(
        ZONE,
        &[
            ("@", Rec::Mx(10, "bad name")),
            ("@", Rec::Mx(0, ".")),
            ("bad name", Rec::A(v4("192.0.2.10"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let err = lookup(&resolver, ZONE).unwrap_err();
    assert!(matches!(err, MxError::MalformedMx(_)), "{err:?}");
    assert!(err.is_permanent());
    assert_eq!(err.enhanced(), "5.4.4");
    assert!(err.to_string().contains("bad"), "{err}");
    // The MX query only: no address was asked for the malformed name.
    assert_eq!(dns.query_count(), 1);
}

#[test]
fn mx_hosts_without_addresses_are_skipped() {
    let dns = TestDns::start(
        ZONE,
        &[
            ("@", Rec::Mx(10, "gone")),
            ("@", Rec::Mx(20, "failing.example.test.")),
            ("@", Rec::Mx(30, "ok")),
            ("ok", Rec::A(v4("192.0.2.30"))),
        ],
    );
    // "failing" is not in the zone's records but is no special name: NXDOMAIN. The
    // SERVFAIL case is `mx_host_servfail_is_temporary`.
    let resolver = Resolver::with_server(dns.addr).unwrap();
    assert_eq!(
        hosts(&lookup(&resolver, ZONE).unwrap()),
        [(30, "ok.example.test")]
    );
}

#[test]
fn mx_host_servfail_beside_a_good_host_is_skipped() {
    let dns = TestDns::start(
        ZONE,
        &[
            ("@", Rec::Mx(10, "servfail")),
            ("@", Rec::Mx(20, "ok")),
            ("ok", Rec::A(v4("192.0.2.20"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    assert_eq!(
        hosts(&lookup(&resolver, ZONE).unwrap()),
        [(20, "ok.example.test")]
    );
    // The host skipped for now is told of: the one used stands in for a better one.
    let found = on_glommio(|| within_deadline(ZONE, resolver.mx_next_hops(ZONE, "me.test")));
    assert_eq!(found.unwrap().pending, Some(10));
}

#[test]
fn mx_host_servfail_is_temporary() {
    let dns = TestDns::start(
        ZONE,
        &[("@", Rec::Mx(10, "servfail")), ("@", Rec::Mx(20, "gone"))],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let err = lookup(&resolver, ZONE).unwrap_err();
    assert!(matches!(err, MxError::Temporary(_)), "{err:?}");
    assert!(!err.is_permanent());
    assert_eq!(err.enhanced(), "4.4.3");
}

#[test]
fn servfail_is_temporary() {
    let dns = TestDns::start(ZONE, &[]);
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let err = lookup(&resolver, "servfail.example.test").unwrap_err();
    assert!(matches!(err, MxError::Temporary(_)), "{err:?}");
}

#[test]
fn silent_server_times_out_as_temporary() {
    let dns = TestDns::start(ZONE, &[]);
    let timeout = Duration::from_millis(200);
    let resolver = Resolver::with_server_timeout(dns.addr, timeout, 2).unwrap();
    let started = Instant::now();
    let err = lookup(&resolver, "silent.example.test").unwrap_err();
    assert!(matches!(err, MxError::Temporary(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(dns.query_count() >= 1);
}

#[test]
fn nothing_listening_is_temporary() {
    let closed: SocketAddr = {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let resolver = Resolver::with_server_timeout(closed, Duration::from_millis(200), 2).unwrap();
    let started = Instant::now();
    let err = lookup(&resolver, ZONE).unwrap_err();
    assert!(matches!(err, MxError::Temporary(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn domain_literals_need_no_lookup() {
    let dns = TestDns::start(ZONE, &[]);
    let resolver = Resolver::with_server(dns.addr).unwrap();
    assert_eq!(
        lookup(&resolver, "[192.0.2.1]").unwrap(),
        [NextHop {
            host: "192.0.2.1".into(),
            preference: 0,
            addrs: vec![ip("192.0.2.1")],
        }]
    );
    assert_eq!(
        lookup(&resolver, "[IPv6:2001:db8::1]").unwrap(),
        [NextHop {
            host: "2001:db8::1".into(),
            preference: 0,
            addrs: vec![ip("2001:db8::1")],
        }]
    );
    assert_eq!(
        lookup(&resolver, "[IPv6:::1]").unwrap()[0].addrs,
        [ip("::1")]
    );
    assert_eq!(dns.query_count(), 0);
}

#[test]
fn cname_at_the_domain_and_at_the_mx_host_is_followed() {
    let dns = TestDns::start(
        ZONE,
        &[
            ("alias", Rec::Cname("real")),
            ("real", Rec::Mx(10, "mx-alias")),
            ("mx-alias", Rec::Cname("mx")),
            ("mx", Rec::A(v4("192.0.2.44"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let hops = lookup(&resolver, "alias.example.test").unwrap();
    assert_eq!(hosts(&hops), [(10, "mx-alias.example.test")]);
    assert_eq!(hops[0].addrs, [ip("192.0.2.44")]);
}

#[test]
fn truncated_udp_answer_is_retried_over_tcp() {
    // 100 A records make an answer of about 1.6 KB, over the 1232-byte EDNS size.
    const ADDRS: u8 = 100;
    let mut records = vec![("@", Rec::Mx(10, "big"))];
    for i in 0..ADDRS {
        records.push(("big", Rec::A(Ipv4Addr::new(198, 51, 100, i))));
    }
    let dns = TestDns::start(ZONE, &records);
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let hops = lookup(&resolver, ZONE).unwrap();
    assert_eq!(hops.len(), 1);
    assert_eq!(hops[0].addrs.len(), usize::from(ADDRS));
    assert!(
        dns.tcp_query_count() >= 1,
        "the truncated answer was not retried over TCP"
    );
}

#[test]
fn many_concurrent_lookups_on_one_executor() {
    let dns = TestDns::start(
        ZONE,
        &[
            ("@", Rec::Mx(10, "mx")),
            ("mx", Rec::A(v4("192.0.2.1"))),
            ("plain", Rec::A(v4("192.0.2.2"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    on_glommio(|| async {
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let resolver = resolver.clone();
                glommio::spawn_local(async move {
                    let domain = if i % 2 == 0 {
                        ZONE
                    } else {
                        "plain.example.test"
                    };
                    next_hops(&resolver, domain).await
                })
            })
            .collect();
        for (i, task) in tasks.into_iter().enumerate() {
            let hops = task.await.unwrap();
            let expected = if i % 2 == 0 {
                "mx.example.test"
            } else {
                "plain.example.test"
            };
            assert_eq!(hops[0].host, expected);
        }
    });
}

#[test]
fn one_resolver_serves_executors_on_several_threads() {
    let dns = TestDns::start(
        ZONE,
        &[("@", Rec::Mx(10, "mx")), ("mx", Rec::A(v4("192.0.2.1")))],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let resolver = resolver.clone();
            std::thread::spawn(move || {
                on_glommio(|| async {
                    for _ in 0..10 {
                        let hops = next_hops(&resolver, ZONE).await.unwrap();
                        assert_eq!(hosts(&hops), [(10, "mx.example.test")]);
                    }
                })
            })
        })
        .collect();
    drop(resolver);
    for thread in threads {
        thread.join().unwrap();
    }
}

/// Awaits `host_next_hops` on a fresh glommio executor, failing after [`DEADLINE`].
fn host_lookup(resolver: &Resolver, host: &str) -> Result<Vec<NextHop>, MxError> {
    on_glommio(|| within_deadline(host, resolver.host_next_hops(host)))
}

#[test]
fn a_configured_host_is_its_own_addresses_whatever_its_mx_records_say() {
    // The relay host or a route's host is the host the operator named: its MX records (to
    // another host, a null MX) are for mail addressed to it, not for mail sent through it.
    let dns = TestDns::start(
        ZONE,
        &[
            ("relay", Rec::A(v4("192.0.2.11"))),
            ("relay", Rec::Mx(10, "other")),
            ("other", Rec::A(v4("192.0.2.12"))),
            ("nullmx", Rec::A(v4("192.0.2.13"))),
            ("nullmx", Rec::Mx(0, ".")),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    assert_eq!(
        host_lookup(&resolver, "relay.example.test").unwrap(),
        [NextHop {
            host: "relay.example.test".into(),
            preference: 0,
            addrs: vec![ip("192.0.2.11")],
        }]
    );
    assert_eq!(
        host_lookup(&resolver, "nullmx.example.test").unwrap()[0].addrs,
        [ip("192.0.2.13")]
    );
    // The MX lookup of the same names still follows their MX records.
    assert_eq!(
        hosts(&lookup(&resolver, "relay.example.test").unwrap()),
        [(10, "other.example.test")]
    );
    // A configured host that does not exist is the operator's mistake: mail waits.
    let err = host_lookup(&resolver, "typo.example.test").unwrap_err();
    assert!(!err.is_permanent(), "{err:?}");
    assert!(err.to_string().contains("typo.example.test"), "{err}");
}

#[test]
fn a_backup_mx_whose_primary_has_no_address_waits_for_it() {
    let dns = TestDns::start(
        ZONE,
        &[
            // This server by its name, at 20, behind a primary whose lookup fails for now...
            ("temp", Rec::Mx(10, "servfail")),
            ("temp", Rec::Mx(20, "us")),
            // ...or whose name does not exist.
            ("gone", Rec::Mx(10, "nowhere")),
            ("gone", Rec::Mx(20, "us")),
            ("us", Rec::A(v4("192.0.2.10"))),
            // This server by its address alone, behind a primary without one.
            ("byaddr", Rec::Mx(10, "nowhere")),
            ("byaddr", Rec::Mx(20, "me")),
            ("me", Rec::A(v4("192.0.2.10"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    // A backup MX keeps the mail for its primary (4.4.4): neither a loop nor a bounce.
    for domain in ["temp", "gone"] {
        let err = lookup_as(&resolver, &format!("{domain}.{ZONE}"), "us.example.test").unwrap_err();
        assert_eq!(
            err,
            MxError::NoPrimary("us.example.test".into()),
            "{domain}"
        );
        assert!(!err.is_permanent(), "{domain}");
        assert_eq!(err.enhanced(), "4.4.4", "{domain}");
    }
    let domain = format!("byaddr.{ZONE}");
    let found =
        on_glommio(|| within_deadline(&domain, resolver.mx_next_hops(&domain, "other.test")))
            .unwrap();
    assert_eq!(
        found.best, 10,
        "the primary without an address still counts"
    );
    assert_eq!(hosts(&found.hops), [(20, "me.example.test")]);
    let listen = [SocketAddr::from(([192, 0, 2, 10], 25))];
    let me = Myself {
        hostname: "other.test",
        listen: &listen,
        port: 25,
    };
    assert_eq!(
        me.drop_from(found, Vec::new),
        Err(MxError::NoPrimary("me.example.test".into()))
    );
}

/// `count` MX records of `preference`, for hosts `{prefix}0`... each with an address of its
/// own (198.51.P.N: the preference's low octet and the host's number).
fn mx_hosts(preference: u16, count: usize, prefix: &str) -> Vec<(&'static str, Rec)> {
    (0..count)
        .flat_map(|i| {
            let host: &'static str = Box::leak(format!("{prefix}{i}").into_boxed_str());
            let (hi, lo) = (preference.to_be_bytes()[1], u8::try_from(i).unwrap());
            [
                ("@", Rec::Mx(preference, host)),
                (host, Rec::A(Ipv4Addr::new(198, 51, hi, lo))),
            ]
        })
        .collect()
}

#[test]
fn this_server_is_found_by_name_in_a_list_longer_than_the_hosts_resolved() {
    // 40 other hosts at this server's preference: RFC 5321 5.1 drops them all with it,
    // wherever the shuffle puts this server, also past the hosts whose addresses are looked up.
    const PEERS: usize = 40;
    const { assert!(PEERS > postern_relay::mx::MAX_MX_HOSTS) };
    let mut records = vec![("@", Rec::Mx(10, "us"))];
    records.extend(mx_hosts(10, PEERS, "peer"));
    let dns = TestDns::start(ZONE, &records);
    let resolver = Resolver::with_server(dns.addr).unwrap();
    // Each lookup shuffles anew; this server would be cut off in more than half of them.
    for round in 0..8 {
        assert_eq!(
            lookup_as(&resolver, ZONE, "us.example.test"),
            Err(MxError::LoopsToSelf("us.example.test".into())),
            "round {round}"
        );
    }
}

#[test]
fn this_server_is_found_by_address_in_a_list_longer_than_the_hosts_resolved_at_once() {
    // The same with this server known by its address only: the preference the first hosts
    // resolved end in is resolved whole, so that the host that is this server is not left
    // unresolved past them, and the mail not sent to another host of its preference.
    const PEERS: usize = 40;
    let mut records = vec![("@", Rec::Mx(10, "me")), ("me", Rec::A(v4("192.0.2.10")))];
    records.extend(mx_hosts(10, PEERS, "peer"));
    let dns = TestDns::start(ZONE, &records);
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let listen = [SocketAddr::from(([192, 0, 2, 10], 25))];
    let me = Myself {
        hostname: "other.test",
        listen: &listen,
        port: 25,
    };
    // Each lookup shuffles anew; this server would be past the first round in most of them.
    for round in 0..8 {
        let found = on_glommio(|| within_deadline(ZONE, resolver.mx_next_hops(ZONE, "other.test")))
            .unwrap();
        assert_eq!(
            me.drop_from(found, Vec::new),
            Err(MxError::LoopsToSelf("me.example.test".into())),
            "round {round}"
        );
    }
}

#[test]
fn the_preference_the_first_hosts_end_in_is_finished_and_no_worse_one_resolved() {
    // 10 hosts at 10, 8 at 20, 40 at 30, all with addresses: the first 16 take the ten and six
    // of the 20s; the other two 20s are resolved, and none of the 30s.
    let mut records = Vec::new();
    for (preference, count) in [(10u16, 10usize), (20, 8), (30, 40)] {
        records.extend(mx_hosts(preference, count, &format!("p{preference}h")));
    }
    let dns = TestDns::start(ZONE, &records);
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let hops = lookup(&resolver, ZONE).unwrap();
    let mut preferences: Vec<u16> = hops.iter().map(|h| h.preference).collect();
    preferences.dedup();
    assert_eq!(preferences, [10, 20]);
    assert_eq!(hops.len(), 18);
}

#[test]
fn a_hosts_addresses_are_shuffled_at_each_lookup_ipv4_first() {
    // Only the first few addresses of a host are tried: each must get its turn, although
    // the DNS (and the resolver's cache) gives them in one order.
    let mut records = vec![("@", Rec::Mx(10, "mx"))];
    let v4s: Vec<IpAddr> = (1..=8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)))
        .collect();
    let v6s: Vec<IpAddr> = ["2001:db8::1", "2001:db8::2"]
        .iter()
        .map(|a| ip(a))
        .collect();
    for a in &v4s {
        let IpAddr::V4(a) = a else { unreachable!() };
        records.push(("mx", Rec::A(*a)));
    }
    for a in &v6s {
        let IpAddr::V6(a) = a else { unreachable!() };
        records.push(("mx", Rec::Aaaa(*a)));
    }
    let dns = TestDns::start(ZONE, &records);
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let mut firsts = std::collections::HashSet::new();
    for _ in 0..30 {
        let hops = lookup(&resolver, ZONE).unwrap();
        let addrs = &hops[0].addrs;
        let (mut four, mut six) = (addrs[..8].to_vec(), addrs[8..].to_vec());
        four.sort();
        six.sort();
        assert_eq!(
            (four, six),
            (v4s.clone(), v6s.clone()),
            "IPv4 first, all there: {addrs:?}"
        );
        firsts.insert(addrs[0]);
    }
    assert!(firsts.len() > 1, "always {firsts:?} first");
}

#[test]
fn an_a_answer_later_than_the_aaaa_one_is_waited_for() {
    // The AAAA answer comes first (a cached one, say) and the A answer a second later: the
    // host keeps its IPv4 addresses, which come first.
    let dns = TestDns::start(
        ZONE,
        &[
            ("@", Rec::Mx(10, "slowv4")),
            ("slowv4", Rec::A(v4("192.0.2.40"))),
            ("slowv4", Rec::Aaaa(v6("2001:db8::40"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let started = Instant::now();
    let hops = lookup(&resolver, ZONE).unwrap();
    assert!(
        started.elapsed() >= support::dns_server::SLOW_ANSWER,
        "the A answer was not late: {:?}",
        started.elapsed()
    );
    assert_eq!(hosts(&hops), [(10, "slowv4.example.test")]);
    assert_eq!(hops[0].addrs, [ip("192.0.2.40"), ip("2001:db8::40")]);
}

#[test]
fn a_host_that_is_nxdomain_to_a_is_no_host_even_when_its_aaaa_lookup_fails() {
    // The only MX host does not exist (NXDOMAIN to the A query) and the name server drops
    // the AAAA query: no mail host, for good, not a lookup to try again for days.
    let dns = TestDns::start(ZONE, &[("@", Rec::Mx(10, "nxv6silent"))]);
    let resolver = Resolver::with_server_timeout(dns.addr, Duration::from_millis(200), 1).unwrap();
    let err = lookup(&resolver, ZONE).unwrap_err();
    assert_eq!(err, MxError::NoMxAddress);
    assert!(err.is_permanent());
    // And the other way round, a host whose AAAA lookup failed beside an A lookup that
    // failed, stays temporary (SERVFAIL to both).
    let dns = TestDns::start(ZONE, &[("@", Rec::Mx(10, "servfail"))]);
    let resolver = Resolver::with_server_timeout(dns.addr, Duration::from_millis(200), 1).unwrap();
    let err = lookup(&resolver, ZONE).unwrap_err();
    assert!(matches!(err, MxError::Temporary(_)), "{err:?}");
}

#[test]
fn a_host_whose_only_address_no_host_can_have_is_a_host_without_address() {
    // A parked domain's 0.0.0.0 (a connection there reaches this machine), `::`, a multicast
    // or the broadcast address, also as IPv4-mapped IPv6: skipped like no address at all.
    let dns = TestDns::start(
        ZONE,
        &[
            ("@", Rec::Mx(10, "parked")),
            ("parked", Rec::A(v4("0.0.0.0"))),
            ("parked", Rec::Aaaa(v6("::ffff:0.0.0.0"))),
            ("@", Rec::Mx(20, "multi")),
            ("multi", Rec::A(v4("224.0.0.1"))),
            ("multi", Rec::Aaaa(v6("::"))),
            // Link-local IPv6: not reachable without the link, which the DNS cannot say.
            ("@", Rec::Mx(25, "link")),
            ("link", Rec::Aaaa(v6("fe80::1"))),
            ("@", Rec::Mx(30, "ok")),
            ("ok", Rec::A(v4("255.255.255.255"))),
            ("ok", Rec::A(v4("192.0.2.30"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let hops = lookup(&resolver, ZONE).unwrap();
    assert_eq!(hosts(&hops), [(30, "ok.example.test")]);
    assert_eq!(hops[0].addrs, [ip("192.0.2.30")]);
    // None left: unable to route, as for hosts without addresses.
    let dns = TestDns::start(
        ZONE,
        &[
            ("@", Rec::Mx(10, "parked")),
            ("parked", Rec::A(v4("0.0.0.0"))),
        ],
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    assert_eq!(lookup(&resolver, ZONE), Err(MxError::NoMxAddress));
    // The implicit MX too.
    let dns = TestDns::start(ZONE, &[("@", Rec::A(v4("0.0.0.0")))]);
    let resolver = Resolver::with_server(dns.addr).unwrap();
    assert_eq!(lookup(&resolver, ZONE), Err(MxError::NoMailHost));
    // And an address literal of one, permanently (5.1.2), without a query.
    for literal in [
        "[0.0.0.0]",
        "[IPv6:::]",
        "[IPv6:::ffff:0.0.0.0]",
        "[224.0.0.5]",
        "[IPv6:fe80::1]",
    ] {
        let err = lookup(&resolver, literal).unwrap_err();
        assert!(
            matches!(err, MxError::NotHostAddress(_)),
            "{literal}: {err:?}"
        );
        assert!(err.is_permanent());
        assert_eq!(err.enhanced(), "5.1.2");
    }
}

#[test]
fn past_the_hosts_resolved_at_once_the_next_ones_are_resolved_when_none_has_an_address() {
    // The best MAX_MX_HOSTS hosts do not exist; the one after them does.
    let n = postern_relay::mx::MAX_MX_HOSTS;
    let mut records = Vec::new();
    for i in 0..n {
        let gone: &'static str = Box::leak(format!("gone{i}").into_boxed_str());
        records.push(("@", Rec::Mx(i as u16 + 1, gone)));
    }
    records.push(("@", Rec::Mx(100, "last")));
    records.push(("last", Rec::A(v4("192.0.2.99"))));
    let dns = TestDns::start(ZONE, &records);
    let resolver = Resolver::with_server(dns.addr).unwrap();
    assert_eq!(
        hosts(&lookup(&resolver, ZONE).unwrap()),
        [(100, "last.example.test")]
    );
}

#[test]
fn an_answer_says_when_its_records_run_past_their_ttl() {
    // The MX records live 60 s; the hosts' addresses (and the implicit MX's) as long: each
    // answer is good until about then, and a domain literal, which rests on no record, for
    // ever.
    let dns = TestDns::start_with_ttl(
        ZONE,
        &[
            ("@", Rec::Mx(10, "mx")),
            ("mx", Rec::A(v4("192.0.2.10"))),
            ("plain", Rec::A(v4("192.0.2.11"))),
        ],
        60,
    );
    let resolver = Resolver::with_server(dns.addr).unwrap();
    let asked = Instant::now();
    let found = |domain: &str| {
        on_glommio(|| within_deadline(domain, resolver.mx_next_hops(domain, "me.test"))).unwrap()
    };
    for domain in [ZONE.to_owned(), format!("plain.{ZONE}")] {
        let until = found(&domain)
            .valid_until
            .expect("an expiry for looked-up records");
        let done = Instant::now();
        assert!(
            until >= asked + Duration::from_secs(59) && until <= done + Duration::from_secs(60),
            "{domain}: good for {:?} after the lookup",
            until.saturating_duration_since(asked)
        );
    }
    let mx = format!("mx.{ZONE}");
    let host = on_glommio(|| within_deadline("mx", resolver.host_hops(&mx)));
    assert!(host.unwrap().valid_until.is_some());
    assert_eq!(found("[192.0.2.12]").valid_until, None);
}
