import ArgumentParser
import XMPPCore
import XMPPStream

@main
struct Braid: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "braid",
        abstract: "An XMPP server for hosting providers.",
        version: BraidVersion.string
    )
}

enum BraidVersion {
    static let string = "0.1.0-dev"
}
