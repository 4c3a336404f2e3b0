import XMPPCore

/// Parses fuzzer input as a JID. Valid JIDs must be canonical: parsing the canonical form
/// again gives the same JID, each part stays within 1023 bytes, and the A-label form of the
/// domain names the same domain.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzJID(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    guard let jid = try? JID(text) else { return 0 }
    guard let again = try? JID(jid.description) else {
        fatalError("canonical form \(jid.description.debugDescription) of \(text.debugDescription) does not parse")
    }
    guard again == jid, again.description == jid.description else {
        fatalError("canonical form is not stable: \(jid) vs \(again)")
    }
    for part in [jid.localpart, Optional(jid.domainpart), jid.resourcepart] {
        if let part, part.utf8.count > JID.maximumPartLength || part.isEmpty {
            fatalError("part out of bounds in \(jid)")
        }
    }
    if !jid.domainpart.hasPrefix("[") {
        guard let ascii = try? JID(domain: jid.asciiDomain), ascii.domainpart == jid.domainpart else {
            fatalError("A-label form \(jid.asciiDomain) does not name \(jid.domainpart)")
        }
    }
    return 0
}
