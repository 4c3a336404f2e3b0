import NIOCore
import NIOSSL
import XMPPCore
import XMPPStream

/// One client session: connect, STARTTLS (or direct TLS), SASL, bind, stream management,
/// then messages. Lives on its worker's event loop and is its channel's last handler.
final class Session: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Phase: String {
        case connecting, features, proceed, sasl, bind, session, enable, ready, closed
    }

    let index: Int
    let worker: Worker
    private(set) var phase: Phase = .connecting
    private var context: ChannelHandlerContext?
    private var scanner = StreamScanner()
    private var pending: ByteBuffer?
    private var tlsActive: Bool
    private var authenticated = false
    private var scram: SCRAMClient?
    private var scramVerified = false
    private var scramSentFinal = false
    private(set) var boundJID: [UInt8]?
    private var offersSM = false
    private var needsSession = false
    private(set) var smEnabled = false
    /// Stanzas received since `<enabled/>` (the `h` we report, RFC: XEP-0198 §4).
    private var smInbound: UInt32 = 0
    /// Stanzas sent since `<enabled/>`: what the server's last `h` should reach.
    private var smOutbound: UInt32 = 0
    private var finalAckPending = false
    private var messagesSent: UInt64 = 0
    let loginStarted: NIODeadline
    var timeout: Scheduled<Void>?
    /// Set when we end the session, so that the close is not counted as a disconnect.
    var closing = false

    init(index: Int, worker: Worker, directTLS: Bool) {
        self.index = index
        self.worker = worker
        self.tlsActive = directTLS
        self.loginStarted = .now()
    }

    var isReady: Bool { phase == .ready }
    var awaitsFinalAck: Bool { finalAckPending }

    // MARK: channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func channelActive(context: ChannelHandlerContext) {
        phase = .features
        write(worker.streamHeader, flush: true)
    }

    func channelInactive(context: ChannelHandlerContext) {
        end(reason: "closed by server in phase \(phase.rawValue)")
        self.context = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        end(reason: Self.describe(error))
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if var buffer = pending {
            pending = nil
            buffer.writeBuffer(&incoming)
            process(buffer)
        } else {
            process(incoming)
        }
    }

    func connectFailed(_ error: any Error) {
        end(reason: "connect: " + Self.describe(error))
    }

    func loginTimedOut() {
        guard phase != .ready, phase != .closed else { return }
        end(reason: "login timeout in phase \(phase.rawValue)")
        context?.close(promise: nil)
    }

    /// Ends the session once; the worker counts it as a login failure or a disconnect.
    private func end(reason: String) {
        guard phase != .closed else { return }
        let was = phase
        phase = .closed
        timeout?.cancel()
        worker.sessionEnded(self, wasPhase: was, reason: reason)
    }

    private static func describe(_ error: any Error) -> String {
        let text = String(describing: error)
        return text.count > 120 ? String(text.prefix(120)) : text
    }

    // MARK: input

    private func process(_ input: ByteBuffer) {
        var buffer = input
        var discardRest = false
        let consumed = buffer.withUnsafeReadableBytes { b -> Int in
            var i = 0
            while i < b.count {
                switch scanner.step(b, from: i) {
                case .need(let at):
                    return at
                case .skip(let to):
                    i = to
                case .streamOpen(let end):
                    i = end
                case .streamClose:
                    end(reason: "stream closed by server in phase \(phase.rawValue)")
                    context?.close(promise: nil)
                    return b.count
                case .element(let start, let end):
                    i = end
                    if !handle(UnsafeRawBufferPointer(rebasing: b[start..<end])) {
                        discardRest = true
                        return b.count
                    }
                }
            }
            return i
        }
        guard !discardRest else { return }
        buffer.moveReaderIndex(forwardBy: consumed)
        if buffer.readableBytes > 0 { pending = buffer }
    }

    private static let message = Array("message".utf8)
    private static let r = Array("r".utf8)
    private static let a = Array("a".utf8)
    private static let iq = Array("iq".utf8)
    private static let presence = Array("presence".utf8)
    private static let features = Array("features".utf8)
    private static let proceed = Array("proceed".utf8)
    private static let challenge = Array("challenge".utf8)
    private static let success = Array("success".utf8)
    private static let failure = Array("failure".utf8)
    private static let enabled = Array("enabled".utf8)
    private static let failed = Array("failed".utf8)
    private static let error = Array("error".utf8)
    private static let typeError1 = Array("type='error'".utf8)
    private static let typeError2 = Array("type=\"error\"".utf8)
    private static let bodyOpen = Array("<body".utf8)

    /// One top-level element; false when the rest of the input must be dropped (STARTTLS).
    private func handle(_ b: UnsafeRawBufferPointer) -> Bool {
        let name = Bytes.localName(b)
        if Bytes.equals(name, Self.message) {
            if smEnabled { smInbound &+= 1 }
            receivedMessage(b)
        } else if Bytes.equals(name, Self.r) {
            worker.stats.smRequestsReceived += 1
            var out = worker.newBuffer(capacity: 48)
            out.writeStaticString("<a xmlns='urn:xmpp:sm:3' h='")
            out.writeDecimal(UInt64(smInbound))
            out.writeStaticString("'/>")
            worker.stats.smAcksSent += 1
            write(out, flush: true)
        } else if Bytes.equals(name, Self.a) {
            worker.stats.smAcksReceived += 1
            if finalAckPending, let h = Bytes.attribute("h", in: b),
               let (value, _) = h.withUnsafeBytes({ Bytes.decimal($0, from: 0) }) {
                finalAckPending = false
                worker.finalAck(acked: value, expected: UInt64(smOutbound))
            }
        } else if Bytes.equals(name, Self.presence) {
            if smEnabled { smInbound &+= 1 }
        } else if Bytes.equals(name, Self.iq) {
            if smEnabled { smInbound &+= 1 }
            receivedIQ(b)
        } else if Bytes.equals(name, Self.features) {
            receivedFeatures(b)
        } else if Bytes.equals(name, Self.proceed) {
            return startTLS()
        } else if Bytes.equals(name, Self.challenge) {
            receivedChallenge(b)
        } else if Bytes.equals(name, Self.success) {
            receivedSuccess(b)
        } else if Bytes.equals(name, Self.failure) {
            fail("sasl failure: " + Self.firstChildName(b))
        } else if Bytes.equals(name, Self.enabled) {
            smEnabled = true
            worker.stats.smEnabled += 1
            loggedIn()
        } else if Bytes.equals(name, Self.failed) {
            worker.countError("sm enable failed: " + Self.firstChildName(b))
            if phase == .enable { loggedIn() }
        } else if Bytes.equals(name, Self.error) {
            fail("stream error: " + Self.firstChildName(b))
        }
        return true
    }

    private static func firstChildName(_ b: UnsafeRawBufferPointer) -> String {
        guard let tagEnd = StreamScanner.tagEnd(b, from: 1), b[tagEnd - 2] != StreamScanner.slash,
              let child = Bytes.index(of: StreamScanner.lt, in: b, from: tagEnd), child + 1 < b.count,
              b[child + 1] != StreamScanner.slash else { return "(none)" }
        return String(decoding: Bytes.localName(UnsafeRawBufferPointer(rebasing: b[child...])), as: UTF8.self)
    }

    private func fail(_ reason: String) {
        end(reason: reason)
        context?.close(promise: nil)
    }

    /// A chat message from another session: the body starts with the time it was sent and
    /// the time it was scheduled for (monotonic nanoseconds, same process).
    private func receivedMessage(_ b: UnsafeRawBufferPointer) {
        let tagEnd = StreamScanner.tagEnd(b, from: 1) ?? b.count
        let startTag = UnsafeRawBufferPointer(rebasing: b[0..<tagEnd])
        if Bytes.contains(Self.typeError1, in: startTag) || Bytes.contains(Self.typeError2, in: startTag) {
            worker.stats.messageErrors += 1
            return
        }
        guard let body = Bytes.index(of: Self.bodyOpen, in: b, from: tagEnd),
              let open = Bytes.index(of: StreamScanner.gt, in: b, from: body),
              let (sent, after) = Bytes.decimal(b, from: open + 1) else {
            worker.stats.otherMessages += 1
            return
        }
        let scheduled = after < b.count && b[after] == UInt8(ascii: " ") ? Bytes.decimal(b, from: after + 1)?.0 : nil
        worker.messageReceived(sent: sent, scheduled: scheduled)
    }

    private func receivedIQ(_ b: UnsafeRawBufferPointer) {
        let id = Bytes.attribute("id", in: b).map { String(decoding: $0, as: UTF8.self) }
        let type = Bytes.attribute("type", in: b).map { String(decoding: $0, as: UTF8.self) } ?? ""
        switch phase {
        case .bind where id == "bind":
            guard type == "result", let jid = Bytes.childText("jid", in: b), !jid.isEmpty else {
                fail("bind failed: " + Self.firstChildName(b))
                return
            }
            boundJID = jid
            if needsSession {
                phase = .session
                write(Self.bytes("<iq type='set' id='sess'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>"), flush: true)
            } else {
                bound()
            }
        case .session where id == "sess":
            guard type == "result" else {
                fail("session failed")
                return
            }
            bound()
        default:
            // A server's request (a ping): answer so that it does not wait on us.
            guard type == "get" || type == "set", let id else { return }
            let from = Bytes.attribute("from", in: b).map { String(decoding: $0, as: UTF8.self) }
            let to = from.map { " to='\($0)'" } ?? ""
            write(Self.bytes("<iq type='result' id='\(id)'\(to)/>"), flush: true)
            if smEnabled { smOutbound &+= 1 }
        }
    }

    private func bound() {
        if worker.config.streamManagement && offersSM {
            phase = .enable
            write(Self.bytes("<enable xmlns='urn:xmpp:sm:3'/>"), flush: true)
        } else {
            if worker.config.streamManagement { worker.countError("stream management not offered") }
            loggedIn()
        }
    }

    private func loggedIn() {
        guard phase != .ready, phase != .closed else { return }
        if worker.config.presence {
            write(Self.bytes("<presence/>"), flush: true)
            if smEnabled { smOutbound &+= 1 }
        }
        phase = .ready
        timeout?.cancel()
        worker.loginSucceeded(self)
    }

    private static let starttls = Array("<starttls".utf8)
    private static let bind = Array("urn:ietf:params:xml:ns:xmpp-bind".utf8)
    private static let sm3 = Array("urn:xmpp:sm:3".utf8)
    private static let sessionNS = Array("urn:ietf:params:xml:ns:xmpp-session".utf8)
    private static let optional = Array("<optional".utf8)

    private func receivedFeatures(_ b: UnsafeRawBufferPointer) {
        if !tlsActive {
            guard worker.config.tls == .starttls, Bytes.contains(Self.starttls, in: b) else {
                fail("no STARTTLS offered")
                return
            }
            phase = .proceed
            write(Self.bytes("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"), flush: true)
        } else if !authenticated {
            startSASL(offered: Bytes.allChildTexts("mechanism", in: b))
        } else {
            guard Bytes.contains(Self.bind, in: b) else {
                fail("no resource binding offered")
                return
            }
            offersSM = Bytes.contains(Self.sm3, in: b)
            needsSession = Bytes.contains(Self.sessionNS, in: b) && !Bytes.contains(Self.optional, in: b)
            phase = .bind
            write(Self.bytes("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>\(worker.config.resource)</resource></bind></iq>"), flush: true)
        }
    }

    private func startTLS() -> Bool {
        guard let context, let ssl = worker.tlsContext else {
            fail("STARTTLS without a TLS context")
            return false
        }
        do {
            let handler = try NIOSSLClientHandler(context: ssl, serverHostname: worker.config.domain)
            try context.pipeline.syncOperations.addHandler(handler, position: .first)
        } catch {
            fail("tls: " + Self.describe(error))
            return false
        }
        tlsActive = true
        scanner = StreamScanner()
        pending = nil
        phase = .features
        // Written through the TLS handler, which holds it until the handshake is done.
        write(worker.streamHeader, flush: true)
        return false
    }

    private func startSASL(offered: [String]) {
        let choice = worker.config.mechanism
        let name: String
        switch choice {
        case .auto:
            guard let first = ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"].first(where: offered.contains) else {
                fail("no usable mechanism (offered: \(offered.joined(separator: " ")))")
                return
            }
            name = first
        default:
            guard offered.contains(choice.rawValue) else {
                fail("\(choice.rawValue) not offered (offered: \(offered.joined(separator: " ")))")
                return
            }
            name = choice.rawValue
        }
        let account = worker.config.account(index)
        let initial: [UInt8]
        if name == "PLAIN" {
            initial = [0] + Array(account.localpart.utf8) + [0] + Array(account.password.utf8)
        } else {
            var client = SCRAMClient(hash: name == "SCRAM-SHA-256" ? .sha256 : .sha1,
                                     username: account.localpart, password: account.password,
                                     minimumIterations: 1)
            do {
                initial = try client.clientFirstMessage()
            } catch {
                fail("scram: \(error)")
                return
            }
            scram = client
        }
        worker.mechanismUsed(name)
        phase = .sasl
        write(Self.bytes("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='\(name)'>\(Base64.encode(initial))</auth>"), flush: true)
    }

    private func receivedChallenge(_ b: UnsafeRawBufferPointer) {
        guard var client = scram, let data = Base64.decode(String(decoding: Bytes.ownText(b), as: UTF8.self)) else {
            fail("sasl: unexpected or undecodable challenge")
            return
        }
        do {
            if scramSentFinal {
                // Some servers send server-final in a challenge, then an empty success.
                if !scramVerified {
                    try client.serverFinalReceived(data)
                    scramVerified = true
                    scram = client
                }
                write(Self.bytes("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"), flush: true)
                return
            }
            let response = try client.serverFirstReceived(data)
            scram = client
            scramSentFinal = true
            write(Self.bytes("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\(Base64.encode(response))</response>"), flush: true)
        } catch {
            fail("scram: \(error)")
        }
    }

    private func receivedSuccess(_ b: UnsafeRawBufferPointer) {
        if var client = scram, !scramVerified {
            let text = String(decoding: Bytes.ownText(b), as: UTF8.self)
            guard let data = Base64.decode(text == "=" ? "" : text) else {
                fail("scram: undecodable success")
                return
            }
            do {
                try client.serverFinalReceived(data)
            } catch {
                fail("scram: server signature: \(error)")
                return
            }
        }
        scram = nil
        authenticated = true
        scanner.inStream = false
        phase = .features
        write(worker.streamHeader, flush: true)
    }

    // MARK: output

    private static func bytes(_ text: String) -> ByteBuffer {
        ByteBuffer(string: text)
    }

    private func write(_ buffer: ByteBuffer, flush: Bool) {
        guard let context else { return }
        if flush {
            context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        } else {
            context.write(wrapOutboundOut(buffer), promise: nil)
        }
    }

    /// One chat message to `jid`, its body the send and scheduled times and padding; built from
    /// prepared byte runs into one buffer, without XML trees or strings.
    func sendMessage(to jid: [UInt8], sent: UInt64, scheduled: UInt64, sequence: UInt64) {
        guard phase == .ready, context != nil else { return }
        let parts = worker.messageParts
        var out = worker.newBuffer(capacity: parts.capacity + jid.count)
        out.writeBytes(parts.prefix)
        out.writeBytes(jid)
        out.writeBytes(parts.idPart)
        out.writeDecimal(sequence)
        out.writeBytes(parts.bodyPart)
        out.writeDecimal(sent)
        out.writeInteger(UInt8(ascii: " "))
        out.writeDecimal(scheduled)
        out.writeBytes(parts.suffix)
        messagesSent += 1
        if smEnabled {
            smOutbound &+= 1
            let every = worker.config.ackEvery
            if every > 0, messagesSent % UInt64(every) == 0 {
                out.writeStaticString("<r xmlns='urn:xmpp:sm:3'/>")
                worker.stats.smRequestsSent += 1
            }
        }
        write(out, flush: true)
    }

    /// Asks for the server's count of our stanzas once sending has ended.
    func requestFinalAck() -> Bool {
        guard phase == .ready, smEnabled, context != nil else { return false }
        finalAckPending = true
        worker.stats.smRequestsSent += 1
        write(Self.bytes("<r xmlns='urn:xmpp:sm:3'/>"), flush: true)
        return true
    }

    func close() {
        guard let context, phase != .closed else { return }
        closing = true
        context.writeAndFlush(wrapOutboundOut(Self.bytes("</stream:stream>")), promise: nil)
        context.close(promise: nil)
    }
}

extension ByteBuffer {
    /// Writes `value` in decimal ASCII.
    mutating func writeDecimal(_ value: UInt64) {
        var digits = 1
        var rest = value / 10
        while rest > 0 {
            digits += 1
            rest /= 10
        }
        writeWithUnsafeMutableBytes(minimumWritableBytes: digits) { out in
            var v = value
            var i = digits - 1
            while i >= 0 {
                out[i] = UInt8(ascii: "0") + UInt8(v % 10)
                v /= 10
                i -= 1
            }
            return digits
        }
    }
}
