// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @title vitaltrail anchor registry
/// @notice Records, for each submitter and stream, the roots of a Merkle
/// log (vitaltrail's epoch log) at growing sizes. A root is recorded once
/// per (submitter, stream, size) and sizes only grow, so no anchor can be
/// rewritten. Each submitter has a namespace of its own: nobody can anchor,
/// or squat, a size of another submitter's stream. Nothing but roots is
/// stored: no reading, device or patient.
///
/// Storage per (submitter, stream) is one slot: the latest size (high 64
/// bits) and the low 192 bits of keccak256(abi.encode(size, root)).
/// Every root ever anchored is in the `Anchored` events.
/// See docs/anchoring.md for how a third party checks an anchor.
contract AnchorRegistry {
    /// `size` is not past the latest size anchored for the stream: that
    /// size (or a later one) is anchored already.
    error AlreadyAnchored(bytes32 stream, uint64 size, uint64 latestSize);
    /// A zero root or a zero size is never a log's.
    error Invalid();

    /// `root` is the stream's root at `size`, as `submitter` anchored it.
    event Anchored(address indexed submitter, bytes32 indexed stream, uint64 indexed size, bytes32 root);

    mapping(address => mapping(bytes32 => uint256)) private heads;

    /// Anchor `root` as the root of `stream` at `size`.
    function anchor(bytes32 stream, uint64 size, bytes32 root) external {
        if (size == 0 || root == bytes32(0)) revert Invalid();
        uint256 head = heads[msg.sender][stream];
        uint64 latest = uint64(head >> 192);
        if (size <= latest) revert AlreadyAnchored(stream, size, latest);
        heads[msg.sender][stream] = (uint256(size) << 192) | commitment(size, root);
        emit Anchored(msg.sender, stream, size, root);
    }

    /// The latest size `submitter` anchored for `stream` (0: none).
    function latestSize(address submitter, bytes32 stream) external view returns (uint64) {
        return uint64(heads[submitter][stream] >> 192);
    }

    /// True when `root` at `size` is the latest anchor of `submitter` for
    /// `stream`. Earlier anchors are checked in the `Anchored` events.
    function isLatest(address submitter, bytes32 stream, uint64 size, bytes32 root)
        external
        view
        returns (bool)
    {
        return heads[submitter][stream] == ((uint256(size) << 192) | commitment(size, root));
    }

    function commitment(uint64 size, bytes32 root) private pure returns (uint256) {
        return uint256(keccak256(abi.encode(size, root))) & ((uint256(1) << 192) - 1);
    }
}
