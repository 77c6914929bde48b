//! The kernel program against the reference model (`mdsec_common::model`) on
//! generated frames: the same action, flow key, verdict, app, segment and packet
//! count for every frame, the same parser stop reasons, and the same frame and
//! byte counts per device. `cargo xtask test`
//! runs 40,000 frames (a fixed seed and a fresh one); `cargo xtask bench
//! differential` runs 1,000,000.

#[test]
fn kernel_and_reference_model_agree_on_generated_frames() {
    let fresh = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    for seed in [0x6d64_7365_6321, fresh] {
        let r = mdsec_tests::differential::run(20_000, seed).unwrap();
        assert_eq!(r.disagreements, 0, "seed {seed}: {:#?}", r.examples);
        // The generator reaches every part of the program.
        assert!(r.dropped > 500 && r.flows > 5000, "{r:?}");
        assert!(r.devices > 10 && r.foreign > 500 && r.gratuitous_arps > 10, "{r:?}");
        for reason in [
            "ok",
            "truncated_l4",
            "bad_ipv4_length",
            "bad_ipv4_version",
            "bad_ipv4_ihl",
            "truncated_ipv6_ext",
            "ipv6_ext_too_deep",
            "vlan_too_deep",
            "bad_tcp_offset",
        ] {
            assert!(
                r.reasons.get(reason).is_some_and(|n| *n > 0),
                "seed {seed}: no frame ended with {reason}: {:?}",
                r.reasons
            );
        }
    }
}

/// The mirror entry: tunnel layers (ERSPAN I–III, GRE with Ethernet or IP,
/// VXLAN, PPPoE, IP-in-IP and 6in4; malformed, opaque, fragmented and too
/// deep ones among them) removed identically by the kernel and the model,
/// counted identically, and the inner frames judged identically.
#[test]
fn kernel_and_reference_model_agree_on_mirror_tunnels() {
    let fresh = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    for seed in [0x7475_6e6e_656c, fresh] {
        let r = mdsec_tests::differential::run_mirror(20_000, seed).unwrap();
        eprintln!("seed {seed}: {} frames, {} flows, tunnels {:?}", r.packets, r.flows, r.tunnels);
        assert_eq!(r.disagreements, 0, "seed {seed}: {:#?}", r.examples);
        assert!(r.flows > 5000, "{r:?}");
        // On a mirror port nothing is dropped: denies are would-drops.
        assert_eq!(r.dropped, 0, "{r:?}");
        // Every layer kind and every stop but the missing judge.
        use mdsec_common::stats::Stat;
        let reached =
            Stat::TUNNEL_LAYERS.iter().chain(Stat::TUNNEL_STOPS).filter(|s| **s != Stat::TunnelNoJudge);
        for stat in reached.map(|s| s.name()) {
            assert!(
                r.tunnels.get(stat).is_some_and(|n| *n > 20),
                "seed {seed}: {stat} reached too rarely: {:?}",
                r.tunnels
            );
        }
        assert_eq!(r.tunnels.get("tunnel_judge_missing"), Some(&0), "{:?}", r.tunnels);
    }
}
