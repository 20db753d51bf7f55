use super::*;

#[test]
fn the_header_is_checked_before_the_rest() {
    let other = br#"{"format": "qemu", "format_version": 1}"#;
    assert!(matches!(SnapshotState::parse(other), Err(SnapshotError::NotASnapshot(_))));
    let future = format!(r#"{{"format": "{FORMAT}", "format_version": 99, "anything": "else"}}"#);
    assert!(matches!(SnapshotState::parse(future.as_bytes()), Err(SnapshotError::WrongVersion { found: 99 })));
    let ours_but_empty = format!(r#"{{"format": "{FORMAT}", "format_version": {FORMAT_VERSION}}}"#);
    assert!(matches!(SnapshotState::parse(ours_but_empty.as_bytes()), Err(SnapshotError::Malformed(_))));
    for garbage in [&b""[..], b"\xff\xfe", b"[]", b"{\"format\": 7}", &[b'{'; 1000]] {
        assert!(SnapshotState::parse(garbage).is_err());
    }
}

#[test]
fn this_host_has_a_cpu_model() {
    let cpu = HostCpu::of_this_host();
    assert_eq!(cpu.vendor.len(), 12, "{cpu}");
    assert_eq!(cpu, HostCpu::of_this_host());
}

#[test]
fn file_args_are_paths_or_inherited_fds() {
    assert_eq!("fd:7".parse::<FileArg>().unwrap(), FileArg::Fd(7));
    assert_eq!("/x/y".parse::<FileArg>().unwrap(), FileArg::Path("/x/y".into()));
    for bad in ["fd:", "fd:2", "fd:x", ""] {
        assert!(bad.parse::<FileArg>().is_err(), "{bad}");
    }
    assert!(FileArg::Fd(987).open().is_err(), "a closed fd is refused, not adopted");
}
